//! A fake MUSA runtime and driver for the tests: the same C entry points, backed by host vectors.
//!
//! Each test thread has its own machine (the runtime's current device is per thread too, so this is natural):
//! `reset(n)` gives it `n` devices. Device addresses start at a non-canonical address that no process maps, so
//! should the device ever hand a device pointer to the CPU, the test crashes instead of passing by luck. Copies
//! the real runtime may finish after it returns (host to device, device to device, peer) are queued and land
//! at `musaStreamSynchronize` (or before a device-to-host copy, which is ordered after them): a test that reads
//! device bytes with [`peek`] right after a copy sees whether the device waited.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::rc::Rc;

use crate::sys::{
    Api, DriverApi, IPC_HANDLE_SIZE, IpcMemHandle, MEMCPY_DEFAULT, MEMCPY_DEVICE_TO_HOST, MEMCPY_HOST_TO_DEVICE,
    MEMORY_TYPE_DEVICE, MuDevicePtr, MuResult, MusaStatus, PointerAttributes,
};

/// Where fake device memory starts: non-canonical on x86-64 and aarch64, never mapped in a user process.
pub(crate) const BASE: u64 = 0x4000_0000_0000_0000;
/// The largest fake allocation; larger ones fail with `musaErrorMemoryAllocation`.
pub(crate) const MAX_ALLOCATION: usize = 64 << 20;

const INVALID_VALUE: MusaStatus = 1;
const MEMORY_ALLOCATION: MusaStatus = 2;
const INVALID_MEMCPY_DIRECTION: MusaStatus = 21;
const NO_DEVICE: MusaStatus = 100;
const INVALID_DEVICE: MusaStatus = 101;
const INVALID_RESOURCE_HANDLE: MusaStatus = 400;
const DRIVER_INVALID_CONTEXT: MuResult = 201;
const DRIVER_NOT_FOUND: MuResult = 500;
const MEMCPY_DEVICE_TO_DEVICE: c_int = 3;
const MAGIC: &[u8; 8] = b"FAKEMUSA";

type Bytes = Rc<RefCell<Vec<u8>>>;

struct Alloc {
    len: u64,
    /// The device the memory lives on.
    device: c_int,
    /// The device whose context the pointer was made in.
    context: c_int,
    bytes: Bytes,
    /// The exporter's address, for an IPC mapping.
    import_of: Option<u64>,
}

struct Machine {
    devices: c_int,
    current: c_int,
    has_context: bool,
    next: u64,
    allocs: BTreeMap<u64, Alloc>,
    last_error: MusaStatus,
    /// Copies not landed yet: (device address, bytes).
    pending: Vec<(u64, Vec<u8>)>,
    set_device_calls: usize,
}

impl Machine {
    fn new(devices: c_int) -> Self {
        Machine {
            devices,
            current: 0,
            has_context: false,
            next: BASE + (1 << 20),
            allocs: BTreeMap::new(),
            last_error: 0,
            pending: Vec::new(),
            set_device_calls: 0,
        }
    }

    fn fail(&mut self, code: MusaStatus) -> MusaStatus {
        self.last_error = code;
        code
    }

    /// The allocation holding `[addr, addr+len)`: (start, allocation).
    fn find(&self, addr: u64, len: usize) -> Option<(u64, &Alloc)> {
        let (start, a) = self.allocs.range(..=addr).next_back()?;
        let end = addr.checked_add(len.max(1) as u64)?;
        (end <= start + a.len).then_some((*start, a))
    }

    /// Device bytes at `addr` (a copy), or `None` when not inside one allocation.
    fn read(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        let (start, a) = self.find(addr, len)?;
        let off = (addr - start) as usize;
        Some(a.bytes.borrow()[off..off + len].to_vec())
    }

    fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((start, a)) = self.find(addr, data.len()) else { return false };
        let off = (addr - start) as usize;
        a.bytes.borrow_mut()[off..off + data.len()].copy_from_slice(data);
        true
    }

    /// Lands every queued copy (in order); copies into memory freed meanwhile are lost.
    fn land(&mut self) {
        for (addr, data) in std::mem::take(&mut self.pending) {
            self.write(addr, &data);
        }
    }
}

thread_local! {
    static MACHINE: RefCell<Machine> = RefCell::new(Machine::new(2));
}

fn with<R>(f: impl FnOnce(&mut Machine) -> R) -> R {
    MACHINE.with(|m| f(&mut m.borrow_mut()))
}

/// A fresh machine with `devices` devices for the calling thread.
pub(crate) fn reset(devices: c_int) {
    with(|m| *m = Machine::new(devices));
}

/// Device bytes as they are now (queued copies not landed), `None` outside allocations.
pub(crate) fn peek(addr: u64, len: usize) -> Option<Vec<u8>> {
    with(|m| m.read(addr, len))
}

/// The thread's current device.
pub(crate) fn current() -> c_int {
    with(|m| m.current)
}

/// Makes `device` current, as application code calling `musaSetDevice` would.
pub(crate) fn select(device: c_int) {
    with(|m| {
        m.current = device;
        m.has_context = true;
    });
}

/// Forgets that the thread has a context (a thread that never used MUSA).
pub(crate) fn drop_context() {
    with(|m| m.has_context = false);
}

/// The sticky last error, without clearing it.
pub(crate) fn last_error() -> MusaStatus {
    with(|m| m.last_error)
}

/// Live allocations and mappings of the machine.
pub(crate) fn live() -> usize {
    with(|m| m.allocs.len())
}

/// How many times `musaSetDevice` was called.
pub(crate) fn set_device_calls() -> usize {
    with(|m| m.set_device_calls)
}

/// Memory some other allocator (an application, a framework) takes from the runtime on `device`.
pub(crate) fn foreign_malloc(device: c_int, len: usize) -> u64 {
    with(|m| {
        let saved = m.current;
        m.current = device;
        let mut p = std::ptr::null_mut();
        // SAFETY: `p` is a valid out-pointer.
        let rc = unsafe { alloc_on(m, &mut p, len) };
        m.current = saved;
        assert_eq!(rc, 0);
        p as u64
    })
}

/// Frees memory taken with [`foreign_malloc`].
pub(crate) fn foreign_free(addr: u64) {
    with(|m| assert!(m.allocs.remove(&addr).is_some_and(|a| a.import_of.is_none())));
}

/// # Safety
/// `ptr` is a valid out-pointer.
unsafe fn alloc_on(m: &mut Machine, ptr: *mut *mut c_void, size: usize) -> MusaStatus {
    if size > MAX_ALLOCATION {
        return m.fail(MEMORY_ALLOCATION);
    }
    let base = m.next;
    m.next += (size as u64).next_multiple_of(1 << 16) + (1 << 16);
    let device = m.current;
    m.allocs.insert(
        base,
        Alloc {
            len: size as u64,
            device,
            context: device,
            bytes: Rc::new(RefCell::new(vec![0; size])),
            import_of: None,
        },
    );
    m.has_context = true;
    // SAFETY: valid out-pointer per the contract.
    unsafe { *ptr = base as *mut c_void };
    0
}

unsafe extern "C" fn get_device_count(count: *mut c_int) -> MusaStatus {
    with(|m| {
        if m.devices == 0 {
            return m.fail(NO_DEVICE);
        }
        // SAFETY: the caller passes a valid out-pointer (musaGetDeviceCount's contract).
        unsafe { *count = m.devices };
        0
    })
}

unsafe extern "C" fn get_device(device: *mut c_int) -> MusaStatus {
    // SAFETY: valid out-pointer per musaGetDevice's contract.
    with(|m| unsafe { *device = m.current });
    0
}

unsafe extern "C" fn set_device(device: c_int) -> MusaStatus {
    with(|m| {
        m.set_device_calls += 1;
        if device < 0 || device >= m.devices {
            return m.fail(INVALID_DEVICE);
        }
        m.current = device;
        m.has_context = true;
        0
    })
}

unsafe extern "C" fn malloc(ptr: *mut *mut c_void, size: usize) -> MusaStatus {
    // SAFETY: valid out-pointer per musaMalloc's contract.
    with(|m| unsafe { alloc_on(m, ptr, size) })
}

unsafe extern "C" fn free(ptr: *mut c_void) -> MusaStatus {
    with(|m| {
        m.has_context = true;
        if ptr.is_null() {
            return 0;
        }
        match m.allocs.get(&(ptr as u64)) {
            Some(a) if a.import_of.is_none() => {
                m.allocs.remove(&(ptr as u64));
                0
            }
            _ => m.fail(INVALID_VALUE),
        }
    })
}

unsafe extern "C" fn memcpy(dst: *mut c_void, src: *const c_void, count: usize, kind: c_int) -> MusaStatus {
    with(|m| {
        let (d, s) = (dst as u64, src as u64);
        let (d_dev, s_dev) = (m.find(d, count).is_some(), m.find(s, count).is_some());
        let (to_device, from_device) = match kind {
            MEMCPY_HOST_TO_DEVICE => (true, false),
            MEMCPY_DEVICE_TO_HOST => (false, true),
            MEMCPY_DEVICE_TO_DEVICE => (true, true),
            MEMCPY_DEFAULT => (d_dev, s_dev),
            _ => return m.fail(INVALID_MEMCPY_DIRECTION),
        };
        if to_device != d_dev || from_device != s_dev {
            // A device side that is no live allocation (freed, or a host pointer): refused, never dereferenced.
            return m.fail(INVALID_VALUE);
        }
        if !to_device {
            // Device to host is ordered after every queued copy and synchronous.
            m.land();
            let Some(data) = m.read(s, count) else { return m.fail(INVALID_VALUE) };
            // SAFETY: `dst` is host memory valid for `count` bytes (musaMemcpy's contract for a host side).
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst.cast::<u8>(), count) };
            return 0;
        }
        let data = if from_device {
            match m.read(s, count) {
                Some(d) => d,
                None => return m.fail(INVALID_VALUE),
            }
        } else {
            // SAFETY: `src` is host memory valid for `count` bytes (musaMemcpy's contract for a host side).
            unsafe { std::slice::from_raw_parts(src.cast::<u8>(), count) }.to_vec()
        };
        m.pending.push((d, data));
        0
    })
}

unsafe extern "C" fn memcpy_peer(
    dst: *mut c_void,
    dst_device: c_int,
    src: *const c_void,
    src_device: c_int,
    count: usize,
) -> MusaStatus {
    with(|m| {
        let ok = |addr: u64, device: c_int| m.find(addr, count).is_some_and(|(_, a)| a.context == device);
        if !ok(dst as u64, dst_device) || !ok(src as u64, src_device) {
            return m.fail(INVALID_VALUE);
        }
        let Some(data) = m.read(src as u64, count) else { return m.fail(INVALID_VALUE) };
        m.pending.push((dst as u64, data));
        0
    })
}

unsafe extern "C" fn stream_synchronize(stream: *mut c_void) -> MusaStatus {
    with(|m| {
        if !stream.is_null() {
            return m.fail(INVALID_RESOURCE_HANDLE);
        }
        m.land();
        0
    })
}

unsafe extern "C" fn pointer_get_attributes(attributes: *mut PointerAttributes, ptr: *const c_void) -> MusaStatus {
    with(|m| {
        m.has_context = true;
        let Some((_, a)) = m.find(ptr as u64, 1) else {
            // As some runtime versions do for unregistered host memory.
            return m.fail(INVALID_VALUE);
        };
        let out = PointerAttributes {
            memory_type: MEMORY_TYPE_DEVICE,
            device: a.device,
            device_pointer: ptr as *mut c_void,
            host_pointer: std::ptr::null_mut(),
        };
        // SAFETY: valid out-pointer per musaPointerGetAttributes's contract.
        unsafe { *attributes = out };
        0
    })
}

unsafe extern "C" fn ipc_get_mem_handle(handle: *mut IpcMemHandle, ptr: *mut c_void) -> MusaStatus {
    with(|m| {
        match m.allocs.get(&(ptr as u64)) {
            Some(a) if a.import_of.is_none() => {}
            _ => return m.fail(INVALID_VALUE),
        }
        let mut reserved = [0u8; IPC_HANDLE_SIZE];
        reserved[..8].copy_from_slice(MAGIC);
        reserved[8..16].copy_from_slice(&(ptr as u64).to_le_bytes());
        // SAFETY: valid out-pointer per musaIpcGetMemHandle's contract.
        unsafe { *handle = IpcMemHandle { reserved } };
        0
    })
}

unsafe extern "C" fn ipc_open_mem_handle(ptr: *mut *mut c_void, handle: IpcMemHandle, flags: c_uint) -> MusaStatus {
    with(|m| {
        if flags != 1 || &handle.reserved[..8] != MAGIC {
            return m.fail(INVALID_VALUE);
        }
        let origin = u64::from_le_bytes(handle.reserved[8..16].try_into().unwrap_or_default());
        let (len, device, bytes) = match m.allocs.get(&origin) {
            Some(a) if a.import_of.is_none() => (a.len, a.device, a.bytes.clone()),
            _ => return m.fail(INVALID_RESOURCE_HANDLE),
        };
        let base = m.next;
        m.next += len.next_multiple_of(1 << 16) + (1 << 16);
        let context = m.current;
        m.allocs.insert(base, Alloc { len, device, context, bytes, import_of: Some(origin) });
        // SAFETY: valid out-pointer per musaIpcOpenMemHandle's contract.
        unsafe { *ptr = base as *mut c_void };
        0
    })
}

unsafe extern "C" fn ipc_close_mem_handle(ptr: *mut c_void) -> MusaStatus {
    with(|m| match m.allocs.get(&(ptr as u64)) {
        Some(a) if a.import_of.is_some() => {
            m.allocs.remove(&(ptr as u64));
            0
        }
        _ => m.fail(INVALID_VALUE),
    })
}

unsafe extern "C" fn device_get_pci_bus_id(bus_id: *mut c_char, len: c_int, device: c_int) -> MusaStatus {
    with(|m| {
        if device < 0 || device >= m.devices {
            return m.fail(INVALID_DEVICE);
        }
        let id = format!("0000:{:02X}:00.0\0", 0x3a + device);
        if (len as usize) < id.len() {
            return m.fail(INVALID_VALUE);
        }
        // SAFETY: `bus_id` is writable for `len` bytes (musaDeviceGetPCIBusId's contract) and id.len() <= len.
        unsafe { std::ptr::copy_nonoverlapping(id.as_ptr(), bus_id.cast::<u8>(), id.len()) };
        0
    })
}

unsafe extern "C" fn get_error_name(error: MusaStatus) -> *const c_char {
    match error {
        0 => c"musaSuccess",
        INVALID_VALUE => c"musaErrorInvalidValue",
        MEMORY_ALLOCATION => c"musaErrorMemoryAllocation",
        INVALID_MEMCPY_DIRECTION => c"musaErrorInvalidMemcpyDirection",
        NO_DEVICE => c"musaErrorNoDevice",
        INVALID_DEVICE => c"musaErrorInvalidDevice",
        INVALID_RESOURCE_HANDLE => c"musaErrorInvalidResourceHandle",
        _ => c"musaErrorUnknown",
    }
    .as_ptr()
}

unsafe extern "C" fn get_error_string(error: MusaStatus) -> *const c_char {
    match error {
        0 => c"no error",
        INVALID_VALUE => c"invalid argument",
        MEMORY_ALLOCATION => c"out of memory",
        NO_DEVICE => c"no MUSA-capable device is detected",
        INVALID_DEVICE => c"invalid device ordinal",
        _ => c"unknown error",
    }
    .as_ptr()
}

unsafe extern "C" fn get_last_error() -> MusaStatus {
    with(|m| std::mem::take(&mut m.last_error))
}

unsafe extern "C" fn runtime_get_version(version: *mut c_int) -> MusaStatus {
    // SAFETY: valid out-pointer per musaRuntimeGetVersion's contract.
    unsafe { *version = 40000 };
    0
}

unsafe extern "C" fn mem_get_address_range(base: *mut MuDevicePtr, size: *mut usize, ptr: MuDevicePtr) -> MuResult {
    with(|m| {
        if !m.has_context {
            return DRIVER_INVALID_CONTEXT;
        }
        let Some((start, a)) = m.find(ptr, 1) else { return DRIVER_NOT_FOUND };
        // SAFETY: valid out-pointers per muMemGetAddressRange_v2's contract.
        unsafe {
            *base = start;
            *size = a.len as usize;
        }
        0
    })
}

unsafe extern "C" fn ctx_get_current(context: *mut *mut c_void) -> MuResult {
    let current = with(|m| m.has_context);
    // SAFETY: valid out-pointer per muCtxGetCurrent's contract.
    unsafe { *context = if current { std::ptr::dangling_mut::<u8>().cast() } else { std::ptr::null_mut() } };
    0
}

const API: Api = Api {
    library: "fake libmusart",
    get_device_count,
    get_device,
    set_device,
    malloc,
    free,
    memcpy,
    memcpy_peer,
    stream_synchronize,
    pointer_get_attributes,
    ipc_get_mem_handle,
    ipc_open_mem_handle,
    ipc_close_mem_handle,
    device_get_pci_bus_id,
    get_error_name,
    get_error_string,
    get_last_error,
    runtime_get_version,
    driver: Some(DriverApi {
        mem_get_address_range: Some(mem_get_address_range),
        ctx_get_current: Some(ctx_get_current),
    }),
};

/// The fake runtime with the driver's entry points.
pub(crate) static WITH_DRIVER: Api = API;
/// The fake runtime without `libmusa.so`.
pub(crate) static WITHOUT_DRIVER: Api = Api { driver: None, ..API };
