//! The MUSA ABI this crate uses, and the loader that finds it at run time.
//!
//! Names and layouts follow Moore Threads' `musa_runtime_api.h` and `musa.h`, which mirror CUDA's runtime and
//! driver APIs with a `musa`/`mu` prefix: `musaError_t` is a C `int` (0 is success), `musaMemcpyKind` and
//! `musaMemoryType` are C enums numbered as CUDA's, `musaPointerAttributes` is `{ type, device, devicePointer,
//! hostPointer }` and `musaIpcMemHandle_t` is 64 opaque bytes. Where the headers were not at hand the CUDA ABI
//! was mirrored; the layout tests below pin what is assumed.
//!
//! The runtime (`libmusart.so`) is required; the driver (`libmusa.so`) is optional and only adds
//! `muMemGetAddressRange_v2` (the allocation holding an address) and `muCtxGetCurrent`. The unsuffixed
//! `muMemGetAddressRange` is the 32-bit v1 entry point (as `cuMemGetAddressRange` is in CUDA) and is never used.

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::sync::OnceLock;

use libloading::Library;

use crate::error::MusaError;

/// `musaError_t`.
pub(crate) type MusaStatus = c_int;
/// `MUresult` (driver API).
pub(crate) type MuResult = c_int;
/// `MUdeviceptr` (64-bit in the v2 driver API).
pub(crate) type MuDevicePtr = u64;

/// `musaSuccess` (and `MUSA_SUCCESS` of the driver).
pub(crate) const SUCCESS: MusaStatus = 0;

/// `musaMemoryTypeDevice` (`musaMemoryTypeUnregistered` = 0, `Host` = 1 and `Managed` = 3 are not ours).
pub(crate) const MEMORY_TYPE_DEVICE: c_int = 2;

/// `musaMemcpyHostToDevice`.
pub(crate) const MEMCPY_HOST_TO_DEVICE: c_int = 1;
/// `musaMemcpyDeviceToHost`.
pub(crate) const MEMCPY_DEVICE_TO_HOST: c_int = 2;
/// `musaMemcpyDefault` (direction inferred from unified virtual addresses).
pub(crate) const MEMCPY_DEFAULT: c_int = 4;

/// `musaIpcMemLazyEnablePeerAccess`.
pub(crate) const IPC_MEM_LAZY_ENABLE_PEER_ACCESS: c_uint = 1;

/// Bytes of a `musaIpcMemHandle_t`.
pub const IPC_HANDLE_SIZE: usize = 64;

/// `musaPointerAttributes`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct PointerAttributes {
    /// `enum musaMemoryType type`.
    pub(crate) memory_type: c_int,
    /// `int device`: the device the memory lives on.
    pub(crate) device: c_int,
    /// `void *devicePointer`.
    pub(crate) device_pointer: *mut c_void,
    /// `void *hostPointer`.
    pub(crate) host_pointer: *mut c_void,
}

/// What `musaPointerGetAttributes` writes into: the attributes followed by slack, so that a runtime whose
/// struct is longer than the one assumed here (an older layout with extra trailing fields) writes into our
/// buffer instead of past it.
#[repr(C)]
pub(crate) struct AttributesSlot {
    pub(crate) attributes: PointerAttributes,
    _slack: [u64; 8],
}

impl AttributesSlot {
    pub(crate) fn zeroed() -> Self {
        AttributesSlot {
            attributes: PointerAttributes {
                memory_type: 0,
                device: -1,
                device_pointer: std::ptr::null_mut(),
                host_pointer: std::ptr::null_mut(),
            },
            _slack: [0; 8],
        }
    }
}

/// `musaIpcMemHandle_t`: `char reserved[64]`, passed by value to `musaIpcOpenMemHandle`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IpcMemHandle {
    pub(crate) reserved: [u8; IPC_HANDLE_SIZE],
}

pub(crate) type GetDeviceCountFn = unsafe extern "C" fn(count: *mut c_int) -> MusaStatus;
pub(crate) type GetDeviceFn = unsafe extern "C" fn(device: *mut c_int) -> MusaStatus;
pub(crate) type SetDeviceFn = unsafe extern "C" fn(device: c_int) -> MusaStatus;
pub(crate) type MallocFn = unsafe extern "C" fn(ptr: *mut *mut c_void, size: usize) -> MusaStatus;
pub(crate) type FreeFn = unsafe extern "C" fn(ptr: *mut c_void) -> MusaStatus;
pub(crate) type MemcpyFn =
    unsafe extern "C" fn(dst: *mut c_void, src: *const c_void, count: usize, kind: c_int) -> MusaStatus;
pub(crate) type MemcpyPeerFn = unsafe extern "C" fn(
    dst: *mut c_void,
    dst_device: c_int,
    src: *const c_void,
    src_device: c_int,
    count: usize,
) -> MusaStatus;
pub(crate) type StreamSynchronizeFn = unsafe extern "C" fn(stream: *mut c_void) -> MusaStatus;
pub(crate) type PointerGetAttributesFn =
    unsafe extern "C" fn(attributes: *mut PointerAttributes, ptr: *const c_void) -> MusaStatus;
pub(crate) type IpcGetMemHandleFn = unsafe extern "C" fn(handle: *mut IpcMemHandle, ptr: *mut c_void) -> MusaStatus;
pub(crate) type IpcOpenMemHandleFn =
    unsafe extern "C" fn(ptr: *mut *mut c_void, handle: IpcMemHandle, flags: c_uint) -> MusaStatus;
pub(crate) type IpcCloseMemHandleFn = unsafe extern "C" fn(ptr: *mut c_void) -> MusaStatus;
pub(crate) type DeviceGetPciBusIdFn =
    unsafe extern "C" fn(bus_id: *mut c_char, len: c_int, device: c_int) -> MusaStatus;
pub(crate) type GetErrorTextFn = unsafe extern "C" fn(error: MusaStatus) -> *const c_char;
pub(crate) type GetLastErrorFn = unsafe extern "C" fn() -> MusaStatus;
pub(crate) type RuntimeGetVersionFn = unsafe extern "C" fn(version: *mut c_int) -> MusaStatus;
pub(crate) type MemGetAddressRangeFn =
    unsafe extern "C" fn(base: *mut MuDevicePtr, size: *mut usize, ptr: MuDevicePtr) -> MuResult;
pub(crate) type CtxGetCurrentFn = unsafe extern "C" fn(context: *mut *mut c_void) -> MuResult;

/// The runtime entry points, resolved once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Api {
    /// The runtime library that was loaded (for messages).
    pub(crate) library: &'static str,
    pub(crate) get_device_count: GetDeviceCountFn,
    pub(crate) get_device: GetDeviceFn,
    pub(crate) set_device: SetDeviceFn,
    pub(crate) malloc: MallocFn,
    pub(crate) free: FreeFn,
    pub(crate) memcpy: MemcpyFn,
    pub(crate) memcpy_peer: MemcpyPeerFn,
    pub(crate) stream_synchronize: StreamSynchronizeFn,
    pub(crate) pointer_get_attributes: PointerGetAttributesFn,
    pub(crate) ipc_get_mem_handle: IpcGetMemHandleFn,
    pub(crate) ipc_open_mem_handle: IpcOpenMemHandleFn,
    pub(crate) ipc_close_mem_handle: IpcCloseMemHandleFn,
    pub(crate) device_get_pci_bus_id: DeviceGetPciBusIdFn,
    pub(crate) get_error_name: GetErrorTextFn,
    pub(crate) get_error_string: GetErrorTextFn,
    pub(crate) get_last_error: GetLastErrorFn,
    pub(crate) runtime_get_version: RuntimeGetVersionFn,
    /// The driver's entry points, when `libmusa.so` was found.
    pub(crate) driver: Option<DriverApi>,
}

/// The driver entry points this crate uses (all optional).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DriverApi {
    /// `muMemGetAddressRange_v2`.
    pub(crate) mem_get_address_range: Option<MemGetAddressRangeFn>,
    /// `muCtxGetCurrent`.
    pub(crate) ctx_get_current: Option<CtxGetCurrentFn>,
}

/// Where the runtime is looked for, in order.
pub(crate) const RUNTIME_CANDIDATES: &[&str] = &["libmusart.so", "libmusart.so.1", "/usr/local/musa/lib/libmusart.so"];
/// Where the driver is looked for, in order.
pub(crate) const DRIVER_CANDIDATES: &[&str] = &["libmusa.so", "libmusa.so.1", "/usr/local/musa/lib/libmusa.so"];

/// The libraries, kept loaded for the life of the process (the [`Api`] points into them).
struct Loaded {
    api: Api,
    _runtime: Library,
    _driver: Option<Library>,
}

static LOADED: OnceLock<Result<Loaded, MusaError>> = OnceLock::new();

/// The MUSA runtime of this process, loaded on first use.
pub(crate) fn api() -> Result<&'static Api, MusaError> {
    match LOADED.get_or_init(|| load(RUNTIME_CANDIDATES, DRIVER_CANDIDATES)) {
        Ok(loaded) => Ok(&loaded.api),
        Err(e) => Err(e.clone()),
    }
}

/// Opens the first library of `candidates` that loads.
fn open_first(candidates: &[&'static str]) -> Result<(Library, &'static str), MusaError> {
    let mut failures = Vec::new();
    for name in candidates {
        // SAFETY: loading a shared library runs its initializers. The candidates are the MUSA runtime or driver
        // (or, in tests, system libraries), whose initializers are meant to run in any process that links them.
        match unsafe { Library::new(name) } {
            Ok(lib) => return Ok((lib, name)),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    Err(MusaError::LibraryNotFound {
        library: candidates.first().copied().unwrap_or("libmusart.so"),
        tried: candidates.to_vec(),
        detail: failures.join("; "),
    })
}

/// Resolves `name` in `lib` as a value of type `T`.
///
/// # Safety
/// `T` must be the C function pointer type of `name` as the MUSA headers declare it.
unsafe fn symbol<T: Copy>(lib: &Library, library: &'static str, name: &'static str) -> Result<T, MusaError> {
    // SAFETY: the caller guarantees that `T` is the symbol's type; the returned pointer is copied out and used
    // only while the library stays loaded (the `Loaded` that owns it lives in a static and is never dropped).
    match unsafe { lib.get::<T>(name.as_bytes()) } {
        Ok(sym) => Ok(*sym),
        Err(e) => Err(MusaError::MissingSymbol { library, symbol: name, detail: e.to_string() }),
    }
}

/// Loads the runtime from the first of `runtime` that opens and resolves every symbol it must have, and the
/// driver from the first of `driver` that opens (its symbols are optional).
fn load(runtime: &[&'static str], driver: &[&'static str]) -> Result<Loaded, MusaError> {
    let (rt, library) = open_first(runtime)?;
    // SAFETY: for every `symbol` call below, the type alias spells the C prototype of the named function in
    // musa_runtime_api.h (see the module documentation for the ABI assumed).
    let api = unsafe {
        Api {
            library,
            get_device_count: symbol(&rt, library, "musaGetDeviceCount")?,
            get_device: symbol(&rt, library, "musaGetDevice")?,
            set_device: symbol(&rt, library, "musaSetDevice")?,
            malloc: symbol(&rt, library, "musaMalloc")?,
            free: symbol(&rt, library, "musaFree")?,
            memcpy: symbol(&rt, library, "musaMemcpy")?,
            memcpy_peer: symbol(&rt, library, "musaMemcpyPeer")?,
            stream_synchronize: symbol(&rt, library, "musaStreamSynchronize")?,
            pointer_get_attributes: symbol(&rt, library, "musaPointerGetAttributes")?,
            ipc_get_mem_handle: symbol(&rt, library, "musaIpcGetMemHandle")?,
            ipc_open_mem_handle: symbol(&rt, library, "musaIpcOpenMemHandle")?,
            ipc_close_mem_handle: symbol(&rt, library, "musaIpcCloseMemHandle")?,
            device_get_pci_bus_id: symbol(&rt, library, "musaDeviceGetPCIBusId")?,
            get_error_name: symbol(&rt, library, "musaGetErrorName")?,
            get_error_string: symbol(&rt, library, "musaGetErrorString")?,
            get_last_error: symbol(&rt, library, "musaGetLastError")?,
            runtime_get_version: symbol(&rt, library, "musaRuntimeGetVersion")?,
            driver: None,
        }
    };
    let (api, driver_lib) = match open_first(driver) {
        Ok((lib, name)) => {
            // SAFETY: the type aliases spell the prototypes of musa.h's v2 entry points.
            let driver = unsafe {
                DriverApi {
                    mem_get_address_range: optional(symbol(&lib, name, "muMemGetAddressRange_v2")),
                    ctx_get_current: optional(symbol(&lib, name, "muCtxGetCurrent")),
                }
            };
            (Api { driver: Some(driver), ..api }, Some(lib))
        }
        Err(e) => {
            tracing::debug!(error = %e, "MUSA driver library not found; foreign memory cannot be range-checked");
            (api, None)
        }
    };
    Ok(Loaded { api, _runtime: rt, _driver: driver_lib })
}

/// The entry point, or `None` (logged) when the library lacks it.
fn optional<T>(sym: Result<T, MusaError>) -> Option<T> {
    match sym {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::debug!(error = %e, "optional MUSA driver entry point missing");
            None
        }
    }
}

/// A C string the runtime returned (static storage), or `fallback` for null or non-UTF-8.
///
/// # Safety
/// `ptr` is null or points to a NUL-terminated string that lives for the rest of the call.
pub(crate) unsafe fn text(ptr: *const c_char, fallback: &str) -> String {
    if ptr.is_null() {
        return fallback.to_string();
    }
    // SAFETY: non-null, and NUL-terminated per the caller's contract.
    let s = unsafe { CStr::from_ptr(ptr) };
    s.to_str().map(str::to_string).unwrap_or_else(|_| fallback.to_string())
}

/// The bus id `musaDeviceGetPCIBusId` wrote into `buf` (up to the first NUL), lower-cased; `None` when empty or
/// not ASCII.
pub(crate) fn parse_bus_id(buf: &[u8]) -> Option<String> {
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let id = std::str::from_utf8(&buf[..end]).ok()?.trim();
    (!id.is_empty() && id.is_ascii()).then(|| id.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use std::mem::{align_of, offset_of, size_of};

    use super::*;

    #[test]
    fn layouts_match_the_headers() {
        assert_eq!(size_of::<PointerAttributes>(), 24);
        assert_eq!(offset_of!(PointerAttributes, memory_type), 0);
        assert_eq!(offset_of!(PointerAttributes, device), 4);
        assert_eq!(offset_of!(PointerAttributes, device_pointer), 8);
        assert_eq!(offset_of!(PointerAttributes, host_pointer), 16);
        assert_eq!(offset_of!(AttributesSlot, attributes), 0);
        assert!(size_of::<AttributesSlot>() >= 2 * size_of::<PointerAttributes>());
        assert_eq!(size_of::<IpcMemHandle>(), IPC_HANDLE_SIZE);
        assert_eq!(align_of::<IpcMemHandle>(), 1);
        assert_eq!(size_of::<MusaStatus>(), 4);
        assert_eq!(size_of::<MuDevicePtr>(), 8);
    }

    #[test]
    fn a_missing_runtime_is_a_typed_error_naming_it() {
        let Err(e) = load(&["libmusart-not-here.so", "/nonexistent/libmusart.so"], &[]) else {
            panic!("a library that does not exist loaded");
        };
        match &e {
            MusaError::LibraryNotFound { library, tried, detail } => {
                assert_eq!(*library, "libmusart-not-here.so");
                assert_eq!(tried.len(), 2);
                assert!(detail.contains("/nonexistent/libmusart.so"), "{detail}");
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(e.to_string().contains("not found (no MUSA runtime on this machine)"), "{e}");
    }

    #[test]
    fn a_library_without_the_runtime_symbols_is_a_typed_error_naming_the_symbol() {
        // libc loads everywhere and has none of the musa* symbols.
        match load(&["libc.so.6"], &[]) {
            Err(MusaError::MissingSymbol { library, symbol, .. }) => {
                assert_eq!(library, "libc.so.6");
                assert_eq!(symbol, "musaGetDeviceCount");
            }
            Err(other) => panic!("unexpected error {other:?}"),
            Ok(_) => panic!("libc passed for the MUSA runtime"),
        }
    }

    #[test]
    fn the_default_candidates_name_libmusart_first() {
        assert_eq!(RUNTIME_CANDIDATES[0], "libmusart.so");
        assert!(RUNTIME_CANDIDATES.contains(&"/usr/local/musa/lib/libmusart.so"));
        assert_eq!(DRIVER_CANDIDATES[0], "libmusa.so");
    }

    #[test]
    fn bus_ids_are_lower_cased_and_cut_at_the_nul() {
        let mut buf = [0u8; 64];
        buf[..12].copy_from_slice(b"0000:3B:00.0");
        assert_eq!(parse_bus_id(&buf).as_deref(), Some("0000:3b:00.0"));
        assert_eq!(parse_bus_id(&[0u8; 16]), None);
        assert_eq!(parse_bus_id(b"0000:04:00.0").as_deref(), Some("0000:04:00.0"));
        assert_eq!(parse_bus_id(&[0xff, 0xfe, 0]), None);
    }

    #[test]
    fn runtime_text_falls_back_on_null() {
        // SAFETY: null is allowed.
        assert_eq!(unsafe { text(std::ptr::null(), "unknown") }, "unknown");
        // SAFETY: a static NUL-terminated string.
        assert_eq!(unsafe { text(c"musaSuccess".as_ptr(), "unknown") }, "musaSuccess");
    }
}
