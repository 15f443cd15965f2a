//! A fake HIP runtime over host memory, so that [`RocmDevice`](crate::RocmDevice)'s logic (records, checks,
//! copies, IPC and VMM sharing, error handling) runs in `cargo test` on machines without a GPU.
//!
//! "Device memory" is anonymous host memory the fake tracks in a table, as the real runtime does, and its
//! calls check pointers against that table the way HIP does (an unknown pointer is an error). VMM memory
//! is a memfd mapped `MAP_SHARED` into reserved ranges, so an export/import pair really aliases the same
//! bytes through two addresses. Test code only: it says nothing about the real runtime's behaviour beyond
//! the documented contract it imitates.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::{CStr, c_char, c_int, c_uint, c_ulonglong, c_void};
use std::sync::Mutex;

use mooncake_core::sync;

use crate::ffi::{self, hipError_t};
use crate::runtime::{Hip, Vmm};

/// GPUs the fake reports.
pub(crate) const DEVICES: c_int = 2;
/// Granularity of fake VMM allocations.
pub(crate) const GRANULARITY: usize = 64 << 10;

thread_local! {
    static CURRENT: Cell<c_int> = const { Cell::new(0) };
    static LAST: Cell<hipError_t> = const { Cell::new(0) };
}

struct Region {
    len: u64,
    device: c_int,
    vmm: bool,
}

struct Phys {
    fd: c_int,
    size: usize,
    device: c_int,
}

struct State {
    regions: BTreeMap<u64, Region>,
    phys: BTreeMap<usize, Phys>,
    next_handle: usize,
    reservations: BTreeMap<u64, usize>,
    ipc_opens: BTreeMap<u64, usize>,
}

static STATE: Mutex<State> = Mutex::new(State {
    regions: BTreeMap::new(),
    phys: BTreeMap::new(),
    next_handle: 1,
    reservations: BTreeMap::new(),
    ipc_opens: BTreeMap::new(),
});

impl State {
    /// The region holding `[addr, addr+len)` entirely.
    fn containing(&self, addr: u64, len: u64) -> Option<(u64, &Region)> {
        let (base, r) = self.regions.range(..=addr).next_back()?;
        (addr.checked_add(len)? <= base + r.len && addr < base + r.len.max(1)).then_some((*base, r))
    }
}

fn fail(code: hipError_t) -> hipError_t {
    LAST.set(code);
    code
}

/// The fake's current device for the calling thread.
pub(crate) fn current_device() -> c_int {
    CURRENT.get()
}

/// The calling thread's sticky error (without clearing it).
pub(crate) fn last_error() -> hipError_t {
    LAST.get()
}

/// True when the fake runtime knows device memory at `addr`.
pub(crate) fn is_device_memory(addr: u64) -> bool {
    sync::lock(&STATE).containing(addr, 0).is_some()
}

/// True when a VMM reservation starts at `addr`.
pub(crate) fn is_reserved(addr: u64) -> bool {
    sync::lock(&STATE).reservations.contains_key(&addr)
}

/// How many IPC mappings of the allocation at `addr` are open.
pub(crate) fn ipc_opens(addr: u64) -> usize {
    sync::lock(&STATE).ipc_opens.get(&addr).copied().unwrap_or(0)
}

/// A fake runtime reporting `version` (ROCm 7.1 and newer take imported fds by value, older by pointer).
pub(crate) fn runtime(version: c_int) -> &'static Hip {
    let import: ffi::hipMemImportFromShareableHandle_t =
        if version >= ffi::HIP_VERSION_FD_BY_VALUE { import_fd_by_value } else { import_fd_by_pointer };
    let version_fn: ffi::hipRuntimeGetVersion_t = if version >= ffi::HIP_VERSION_FD_BY_VALUE { v71 } else { v64 };
    Box::leak(Box::new(Hip {
        library: format!("fake HIP {version}"),
        get_device_count,
        set_device,
        get_device,
        runtime_get_version: version_fn,
        device_get_attribute,
        device_get_pci_bus_id,
        malloc,
        free,
        memcpy,
        memcpy_peer,
        pointer_get_attributes,
        mem_get_address_range,
        ipc_get_mem_handle,
        ipc_open_mem_handle,
        ipc_close_mem_handle,
        get_error_name: error_name,
        get_error_string: error_name,
        get_last_error: Some(get_last_error),
        vmm: Some(Vmm {
            mem_create,
            export,
            import,
            reserve,
            map,
            set_access,
            unmap,
            address_free,
            release,
            granularity,
        }),
        lib: libloading::os::unix::Library::this().into(),
    }))
}

unsafe extern "C" fn v71(out: *mut c_int) -> hipError_t {
    // SAFETY: the caller passes a valid out pointer.
    unsafe { *out = 70_100_000 };
    0
}

unsafe extern "C" fn v64(out: *mut c_int) -> hipError_t {
    // SAFETY: the caller passes a valid out pointer.
    unsafe { *out = 60_400_000 };
    0
}

unsafe extern "C" fn get_device_count(out: *mut c_int) -> hipError_t {
    // SAFETY: the caller passes a valid out pointer.
    unsafe { *out = DEVICES };
    0
}

unsafe extern "C" fn set_device(d: c_int) -> hipError_t {
    if !(0..DEVICES).contains(&d) {
        return fail(ffi::hipErrorInvalidDevice);
    }
    CURRENT.set(d);
    0
}

unsafe extern "C" fn get_device(out: *mut c_int) -> hipError_t {
    // SAFETY: the caller passes a valid out pointer.
    unsafe { *out = CURRENT.get() };
    0
}

unsafe extern "C" fn device_get_attribute(out: *mut c_int, attr: c_int, d: c_int) -> hipError_t {
    if attr != ffi::hipDeviceAttributeVirtualMemoryManagementSupported || !(0..DEVICES).contains(&d) {
        return fail(ffi::hipErrorInvalidValue);
    }
    // SAFETY: the caller passes a valid out pointer.
    unsafe { *out = 1 };
    0
}

unsafe extern "C" fn device_get_pci_bus_id(buf: *mut c_char, len: c_int, d: c_int) -> hipError_t {
    if !(0..DEVICES).contains(&d) {
        return fail(ffi::hipErrorInvalidDevice);
    }
    let id = format!("0000:C{d}:00.0\0");
    if id.len() > len as usize {
        return fail(ffi::hipErrorInvalidValue);
    }
    // SAFETY: `buf` is writable for `len` bytes, checked above to hold the id and its NUL.
    unsafe { std::ptr::copy_nonoverlapping(id.as_ptr().cast::<c_char>(), buf, id.len()) };
    0
}

fn map_anonymous(len: usize) -> Option<u64> {
    // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p as u64)
}

unsafe extern "C" fn malloc(out: *mut *mut c_void, size: usize) -> hipError_t {
    if size == 0 {
        return fail(ffi::hipErrorInvalidValue);
    }
    let Some(p) = map_anonymous(size) else { return fail(ffi::hipErrorOutOfMemory) };
    sync::lock(&STATE).regions.insert(p, Region { len: size as u64, device: CURRENT.get(), vmm: false });
    // SAFETY: the caller passes a valid out pointer.
    unsafe { *out = p as *mut c_void };
    0
}

unsafe extern "C" fn free(ptr: *mut c_void) -> hipError_t {
    let mut st = sync::lock(&STATE);
    match st.regions.get(&(ptr as u64)) {
        Some(r) if !r.vmm => {
            let len = r.len as usize;
            st.regions.remove(&(ptr as u64));
            // SAFETY: the region was this fake's own mapping of `len` bytes, now forgotten.
            unsafe { libc::munmap(ptr, len) };
            0
        }
        _ => fail(ffi::hipErrorInvalidValue),
    }
}

unsafe extern "C" fn memcpy(dst: *mut c_void, src: *const c_void, n: usize, kind: c_int) -> hipError_t {
    let ok = {
        let st = sync::lock(&STATE);
        let dev = |p: u64| st.containing(p, n as u64).is_some();
        match kind {
            ffi::hipMemcpyHostToDevice => dev(dst as u64),
            ffi::hipMemcpyDeviceToHost => dev(src as u64),
            ffi::hipMemcpyDeviceToDevice | ffi::hipMemcpyDefault => dev(dst as u64) && dev(src as u64),
            _ => false,
        }
    };
    if !ok {
        return fail(ffi::hipErrorInvalidValue);
    }
    // SAFETY: the device sides were found in the fake's table (mapped host memory), the host sides are the
    // caller's (valid per hipMemcpy's contract).
    unsafe { std::ptr::copy(src.cast::<u8>(), dst.cast::<u8>(), n) };
    0
}

unsafe extern "C" fn memcpy_peer(dst: *mut c_void, dd: c_int, src: *const c_void, sd: c_int, n: usize) -> hipError_t {
    let ok = {
        let st = sync::lock(&STATE);
        let on = |p: u64, d: c_int| st.containing(p, n as u64).is_some_and(|(_, r)| r.device == d);
        on(dst as u64, dd) && on(src as u64, sd)
    };
    if !ok {
        return fail(ffi::hipErrorInvalidValue);
    }
    // SAFETY: both ranges were found in the fake's table (mapped host memory).
    unsafe { std::ptr::copy(src.cast::<u8>(), dst.cast::<u8>(), n) };
    0
}

unsafe extern "C" fn pointer_get_attributes(out: *mut ffi::hipPointerAttribute_t, ptr: *const c_void) -> hipError_t {
    let mut a = ffi::hipPointerAttribute_t::zeroed();
    if let Some((_, r)) = sync::lock(&STATE).containing(ptr as u64, 0) {
        a.r#type = ffi::hipMemoryTypeDevice;
        a.device = r.device;
        a.devicePointer = ptr as *mut c_void;
    }
    // SAFETY: the caller passes a valid out pointer.
    unsafe { *out = a };
    0
}

unsafe extern "C" fn mem_get_address_range(base: *mut *mut c_void, size: *mut usize, ptr: *mut c_void) -> hipError_t {
    let Some((b, len)) = sync::lock(&STATE).containing(ptr as u64, 0).map(|(b, r)| (b, r.len)) else {
        return fail(ffi::hipErrorNotFound);
    };
    // SAFETY: the caller passes valid out pointers.
    unsafe {
        *base = b as *mut c_void;
        *size = len as usize;
    }
    0
}

const IPC_MAGIC: &[u8; 8] = b"FAKEIPC\0";

unsafe extern "C" fn ipc_get_mem_handle(out: *mut ffi::hipIpcMemHandle_t, ptr: *mut c_void) -> hipError_t {
    let st = sync::lock(&STATE);
    let Some(r) = st.regions.get(&(ptr as u64)).filter(|r| !r.vmm) else {
        return fail(ffi::hipErrorInvalidDevicePointer);
    };
    let mut bytes = [0u8; 64];
    bytes[..8].copy_from_slice(IPC_MAGIC);
    bytes[8..16].copy_from_slice(&(ptr as u64).to_le_bytes());
    bytes[16..24].copy_from_slice(&r.len.to_le_bytes());
    // SAFETY: the caller passes a valid out pointer.
    unsafe { *out = ffi::hipIpcMemHandle_t::from_bytes(&bytes) };
    0
}

/// Opening a handle of this same process maps nothing new: it returns the exporter's address (the
/// importer is a different `RocmDevice`, with its own records).
unsafe extern "C" fn ipc_open_mem_handle(
    out: *mut *mut c_void,
    h: ffi::hipIpcMemHandle_t,
    flags: c_uint,
) -> hipError_t {
    if flags != ffi::hipIpcMemLazyEnablePeerAccess {
        return fail(ffi::hipErrorInvalidValue);
    }
    let bytes = h.to_bytes();
    let base = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default());
    let mut st = sync::lock(&STATE);
    if &bytes[..8] != IPC_MAGIC || st.regions.get(&base).is_none_or(|r| r.vmm) {
        return fail(ffi::hipErrorMapFailed);
    }
    *st.ipc_opens.entry(base).or_default() += 1;
    // SAFETY: the caller passes a valid out pointer.
    unsafe { *out = base as *mut c_void };
    0
}

unsafe extern "C" fn ipc_close_mem_handle(ptr: *mut c_void) -> hipError_t {
    let mut st = sync::lock(&STATE);
    match st.ipc_opens.get_mut(&(ptr as u64)) {
        Some(n) if *n > 0 => {
            *n -= 1;
            0
        }
        _ => fail(ffi::hipErrorInvalidValue),
    }
}

unsafe extern "C" fn error_name(code: hipError_t) -> *const c_char {
    let name: &'static CStr = match code {
        ffi::hipErrorInvalidValue => c"hipErrorInvalidValue",
        ffi::hipErrorOutOfMemory => c"hipErrorOutOfMemory",
        ffi::hipErrorInvalidDevicePointer => c"hipErrorInvalidDevicePointer",
        ffi::hipErrorInvalidDevice => c"hipErrorInvalidDevice",
        ffi::hipErrorMapFailed => c"hipErrorMapFailed",
        ffi::hipErrorNotFound => c"hipErrorNotFound",
        _ => c"hipErrorUnknown",
    };
    name.as_ptr()
}

unsafe extern "C" fn get_last_error() -> hipError_t {
    LAST.replace(0)
}

unsafe extern "C" fn granularity(out: *mut usize, prop: *const ffi::hipMemAllocationProp, option: c_int) -> hipError_t {
    // SAFETY: the caller passes a valid property struct.
    let p = unsafe { &*prop };
    if p.r#type != ffi::hipMemAllocationTypePinned
        || p.location.r#type != ffi::hipMemLocationTypeDevice
        || option != ffi::hipMemAllocationGranularityMinimum
    {
        return fail(ffi::hipErrorInvalidValue);
    }
    // SAFETY: the caller passes a valid out pointer.
    unsafe { *out = GRANULARITY };
    0
}

unsafe extern "C" fn mem_create(
    out: *mut ffi::hipMemGenericAllocationHandle_t,
    size: usize,
    prop: *const ffi::hipMemAllocationProp,
    _flags: c_ulonglong,
) -> hipError_t {
    // SAFETY: the caller passes a valid property struct.
    let p = unsafe { &*prop };
    if size == 0
        || size % GRANULARITY != 0
        || p.r#type != ffi::hipMemAllocationTypePinned
        || p.requestedHandleType != ffi::hipMemHandleTypePosixFileDescriptor
        || p.location.r#type != ffi::hipMemLocationTypeDevice
        || !(0..DEVICES).contains(&p.location.id)
    {
        return fail(ffi::hipErrorInvalidValue);
    }
    // SAFETY: plain system calls on a descriptor this function creates and owns.
    let fd = unsafe {
        let fd = libc::memfd_create(c"fake-hip".as_ptr(), libc::MFD_CLOEXEC);
        if fd < 0 || libc::ftruncate(fd, size as libc::off_t) != 0 {
            return fail(ffi::hipErrorOutOfMemory);
        }
        fd
    };
    let mut st = sync::lock(&STATE);
    let id = st.next_handle;
    st.next_handle += 1;
    st.phys.insert(id, Phys { fd, size, device: p.location.id });
    // SAFETY: the caller passes a valid out pointer.
    unsafe { *out = id as ffi::hipMemGenericAllocationHandle_t };
    0
}

unsafe extern "C" fn export(
    out: *mut c_void,
    handle: ffi::hipMemGenericAllocationHandle_t,
    kind: c_int,
    _flags: c_ulonglong,
) -> hipError_t {
    let st = sync::lock(&STATE);
    let Some(p) = st.phys.get(&(handle as usize)).filter(|_| kind == ffi::hipMemHandleTypePosixFileDescriptor) else {
        return fail(ffi::hipErrorInvalidValue);
    };
    // SAFETY: duplicating a descriptor the fake owns; the copy is the caller's.
    let fd = unsafe { libc::fcntl(p.fd, libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return fail(ffi::hipErrorInvalidValue);
    }
    // SAFETY: for a POSIX fd handle the caller passes a pointer to an `int`.
    unsafe { *out.cast::<c_int>() = fd };
    0
}

fn import_fd(out: *mut ffi::hipMemGenericAllocationHandle_t, fd: c_int) -> hipError_t {
    // SAFETY: duplicating the caller's descriptor (fcntl fails cleanly on a bad one) and asking its size.
    let (dup, size) = unsafe {
        let dup = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0);
        if dup < 0 {
            return fail(ffi::hipErrorInvalidValue);
        }
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(dup, &mut st) != 0 {
            libc::close(dup);
            return fail(ffi::hipErrorInvalidValue);
        }
        (dup, st.st_size as usize)
    };
    let mut st = sync::lock(&STATE);
    let id = st.next_handle;
    st.next_handle += 1;
    st.phys.insert(id, Phys { fd: dup, size, device: CURRENT.get() });
    // SAFETY: the caller passes a valid out pointer.
    unsafe { *out = id as ffi::hipMemGenericAllocationHandle_t };
    0
}

/// ROCm 7.1 and newer: the descriptor itself, cast to a pointer.
unsafe extern "C" fn import_fd_by_value(
    out: *mut ffi::hipMemGenericAllocationHandle_t,
    os_handle: *mut c_void,
    kind: c_int,
) -> hipError_t {
    if kind != ffi::hipMemHandleTypePosixFileDescriptor || os_handle as usize > c_int::MAX as usize {
        return fail(ffi::hipErrorInvalidValue);
    }
    import_fd(out, os_handle as usize as c_int)
}

/// Older releases: a pointer to the descriptor.
unsafe extern "C" fn import_fd_by_pointer(
    out: *mut ffi::hipMemGenericAllocationHandle_t,
    os_handle: *mut c_void,
    kind: c_int,
) -> hipError_t {
    // A small integer is a descriptor passed the 7.1 way: refuse it rather than dereference it.
    if kind != ffi::hipMemHandleTypePosixFileDescriptor || (os_handle as usize) < 4096 {
        return fail(ffi::hipErrorInvalidValue);
    }
    // SAFETY: checked above to be a real pointer, which older releases' contract makes a pointer to an int.
    import_fd(out, unsafe { *os_handle.cast::<c_int>() })
}

unsafe extern "C" fn reserve(
    out: *mut *mut c_void,
    size: usize,
    align: usize,
    _addr: *mut c_void,
    _flags: c_ulonglong,
) -> hipError_t {
    let align = align.max(4096);
    if size == 0 || !align.is_power_of_two() {
        return fail(ffi::hipErrorInvalidValue);
    }
    // SAFETY: a fresh inaccessible mapping, trimmed to an aligned range below; nothing else is touched.
    let start = unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            size + align,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return fail(ffi::hipErrorOutOfMemory);
        }
        let p = p as usize;
        let start = p.next_multiple_of(align);
        if start > p {
            libc::munmap(p as *mut c_void, start - p);
        }
        let tail = p + size + align - (start + size);
        if tail > 0 {
            libc::munmap((start + size) as *mut c_void, tail);
        }
        start as u64
    };
    sync::lock(&STATE).reservations.insert(start, size);
    // SAFETY: the caller passes a valid out pointer.
    unsafe { *out = start as *mut c_void };
    0
}

unsafe extern "C" fn map(
    ptr: *mut c_void,
    size: usize,
    offset: usize,
    handle: ffi::hipMemGenericAllocationHandle_t,
    _flags: c_ulonglong,
) -> hipError_t {
    let mut st = sync::lock(&STATE);
    let addr = ptr as u64;
    let reserved = st.reservations.range(..=addr).next_back().is_some_and(|(b, s)| addr + size as u64 <= b + *s as u64);
    let Some(p) = st.phys.get(&(handle as usize)) else { return fail(ffi::hipErrorInvalidValue) };
    if !reserved || offset != 0 || size == 0 || size > p.size || st.containing(addr, size as u64).is_some() {
        return fail(ffi::hipErrorInvalidValue);
    }
    let device = p.device;
    // SAFETY: `[ptr, ptr+size)` lies in a reservation of this fake with nothing mapped there; the memfd holds
    // at least `size` bytes.
    let m = unsafe {
        libc::mmap(ptr, size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED | libc::MAP_FIXED, p.fd, 0)
    };
    if m == libc::MAP_FAILED {
        return fail(ffi::hipErrorOutOfMemory);
    }
    st.regions.insert(addr, Region { len: size as u64, device, vmm: true });
    0
}

unsafe extern "C" fn set_access(
    ptr: *mut c_void,
    size: usize,
    desc: *const ffi::hipMemAccessDesc,
    count: usize,
) -> hipError_t {
    let st = sync::lock(&STATE);
    if !st.regions.get(&(ptr as u64)).is_some_and(|r| r.vmm && r.len == size as u64) || count == 0 {
        return fail(ffi::hipErrorInvalidValue);
    }
    // SAFETY: the caller passes `count` descriptors.
    let descs = unsafe { std::slice::from_raw_parts(desc, count) };
    let valid = |d: &ffi::hipMemAccessDesc| {
        d.location.r#type == ffi::hipMemLocationTypeDevice
            && (0..DEVICES).contains(&d.location.id)
            && d.flags == ffi::hipMemAccessFlagsProtReadWrite
    };
    if descs.iter().all(valid) { 0 } else { fail(ffi::hipErrorInvalidValue) }
}

unsafe extern "C" fn unmap(ptr: *mut c_void, size: usize) -> hipError_t {
    let mut st = sync::lock(&STATE);
    if !st.regions.get(&(ptr as u64)).is_some_and(|r| r.vmm && r.len == size as u64) {
        return fail(ffi::hipErrorInvalidValue);
    }
    st.regions.remove(&(ptr as u64));
    // SAFETY: replaces the fake's own mapping with an inaccessible one, keeping the reservation.
    unsafe { libc::mmap(ptr, size, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED, -1, 0) };
    0
}

unsafe extern "C" fn address_free(ptr: *mut c_void, size: usize) -> hipError_t {
    let mut st = sync::lock(&STATE);
    let addr = ptr as u64;
    let busy = st.regions.range(addr..addr + size as u64).next().is_some();
    if st.reservations.get(&addr) != Some(&size) || busy {
        return fail(ffi::hipErrorInvalidValue);
    }
    st.reservations.remove(&addr);
    // SAFETY: the reservation was the fake's own mapping and nothing is mapped in it.
    unsafe { libc::munmap(ptr, size) };
    0
}

unsafe extern "C" fn release(handle: ffi::hipMemGenericAllocationHandle_t) -> hipError_t {
    match sync::lock(&STATE).phys.remove(&(handle as usize)) {
        Some(p) => {
            // SAFETY: the fake owned this descriptor; mappings of it stay valid after close.
            unsafe { libc::close(p.fd) };
            0
        }
        None => fail(ffi::hipErrorInvalidValue),
    }
}
