//! The C types and constants of ROCm's `hip/hip_runtime_api.h` this crate uses, declared by hand (no ROCm
//! headers are needed to build), with the header's names so each can be checked against it.
//!
//! Layouts are those of ROCm 6 and 7 on 64-bit Linux (LP64); the tests at the bottom pin every size and field
//! offset to the header's. ROCm 6.0 changed [`hipPointerAttribute_t`] (field `memoryType` renamed `type`, and
//! [`hipMemoryType`] renumbered with `hipMemoryTypeUnregistered = 0`): ROCm 5 is not supported.
#![allow(non_camel_case_types, non_snake_case, non_upper_case_globals)]

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void};

/// `hipError_t`: a C enum, `int` sized.
pub type hipError_t = c_int;

/// `hipSuccess`.
pub const hipSuccess: hipError_t = 0;
/// `hipErrorInvalidValue`.
pub const hipErrorInvalidValue: hipError_t = 1;
/// `hipErrorOutOfMemory`.
pub const hipErrorOutOfMemory: hipError_t = 2;
/// `hipErrorNotInitialized`.
pub const hipErrorNotInitialized: hipError_t = 3;
/// `hipErrorInvalidDevicePointer`.
pub const hipErrorInvalidDevicePointer: hipError_t = 17;
/// `hipErrorInsufficientDriver`.
pub const hipErrorInsufficientDriver: hipError_t = 35;
/// `hipErrorNoDevice`: what `hipGetDeviceCount` returns on a machine without AMD GPUs.
pub const hipErrorNoDevice: hipError_t = 100;
/// `hipErrorInvalidDevice`: an ordinal out of range.
pub const hipErrorInvalidDevice: hipError_t = 101;
/// `hipErrorMapFailed`: an IPC attach that failed in ROCr.
pub const hipErrorMapFailed: hipError_t = 205;
/// `hipErrorInvalidHandle`.
pub const hipErrorInvalidHandle: hipError_t = 400;
/// `hipErrorNotFound`.
pub const hipErrorNotFound: hipError_t = 500;
/// `hipErrorNotSupported`.
pub const hipErrorNotSupported: hipError_t = 801;

/// `hipMemcpyKind` (a C enum, `int` sized).
pub type hipMemcpyKind = c_int;
/// `hipMemcpyHostToHost`.
pub const hipMemcpyHostToHost: hipMemcpyKind = 0;
/// `hipMemcpyHostToDevice`.
pub const hipMemcpyHostToDevice: hipMemcpyKind = 1;
/// `hipMemcpyDeviceToHost`.
pub const hipMemcpyDeviceToHost: hipMemcpyKind = 2;
/// `hipMemcpyDeviceToDevice`.
pub const hipMemcpyDeviceToDevice: hipMemcpyKind = 3;
/// `hipMemcpyDefault`: the runtime infers the direction from the (unified) virtual addresses.
pub const hipMemcpyDefault: hipMemcpyKind = 4;

/// `hipMemoryType` (ROCm 6 numbering), the `type` of a [`hipPointerAttribute_t`].
pub type hipMemoryType = c_int;
/// `hipMemoryTypeUnregistered`: host memory HIP does not know.
pub const hipMemoryTypeUnregistered: hipMemoryType = 0;
/// `hipMemoryTypeHost`: pinned or registered host memory.
pub const hipMemoryTypeHost: hipMemoryType = 1;
/// `hipMemoryTypeDevice`: memory on the GPU named by `device`.
pub const hipMemoryTypeDevice: hipMemoryType = 2;
/// `hipMemoryTypeManaged`: managed (unified) memory.
pub const hipMemoryTypeManaged: hipMemoryType = 3;
/// `hipMemoryTypeArray`.
pub const hipMemoryTypeArray: hipMemoryType = 10;
/// `hipMemoryTypeUnified`.
pub const hipMemoryTypeUnified: hipMemoryType = 11;

/// `hipDeviceAttribute_t` (a C enum, `int` sized).
pub type hipDeviceAttribute_t = c_int;
/// `hipDeviceAttributeVirtualMemoryManagementSupported` (89 in ROCm 6.0 through 7.x).
pub const hipDeviceAttributeVirtualMemoryManagementSupported: hipDeviceAttribute_t = 89;

/// `HIP_IPC_HANDLE_SIZE`.
pub const HIP_IPC_HANDLE_SIZE: usize = 64;
/// `hipIpcMemLazyEnablePeerAccess`: the one flag `hipIpcOpenMemHandle` accepts.
pub const hipIpcMemLazyEnablePeerAccess: c_uint = 0x01;

/// `hipIpcMemHandle_t`: `struct hipIpcMemHandle_st { char reserved[HIP_IPC_HANDLE_SIZE]; }`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct hipIpcMemHandle_t {
    /// Opaque handle bytes.
    pub reserved: [c_char; HIP_IPC_HANDLE_SIZE],
}

impl hipIpcMemHandle_t {
    /// All zeros (what the runtime overwrites).
    pub const fn zeroed() -> Self {
        hipIpcMemHandle_t { reserved: [0; HIP_IPC_HANDLE_SIZE] }
    }

    /// The handle as bytes.
    pub fn to_bytes(&self) -> [u8; HIP_IPC_HANDLE_SIZE] {
        self.reserved.map(|b| b as u8)
    }

    /// A handle from its bytes.
    pub fn from_bytes(bytes: &[u8; HIP_IPC_HANDLE_SIZE]) -> Self {
        hipIpcMemHandle_t { reserved: bytes.map(|b| b as c_char) }
    }
}

/// `hipPointerAttribute_t` as ROCm 6 and 7 define it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct hipPointerAttribute_t {
    /// `enum hipMemoryType type`.
    pub r#type: hipMemoryType,
    /// `int device`: the GPU ordinal the memory lives on (for device memory).
    pub device: c_int,
    /// `void* devicePointer`.
    pub devicePointer: *mut c_void,
    /// `void* hostPointer`.
    pub hostPointer: *mut c_void,
    /// `int isManaged`.
    pub isManaged: c_int,
    /// `unsigned allocationFlags`.
    pub allocationFlags: c_uint,
}

impl hipPointerAttribute_t {
    /// All zeros (`hipMemoryTypeUnregistered`).
    pub const fn zeroed() -> Self {
        hipPointerAttribute_t {
            r#type: hipMemoryTypeUnregistered,
            device: 0,
            devicePointer: std::ptr::null_mut(),
            hostPointer: std::ptr::null_mut(),
            isManaged: 0,
            allocationFlags: 0,
        }
    }
}

/// `hipMemAllocationType`.
pub type hipMemAllocationType = c_int;
/// `hipMemAllocationTypePinned`: the only type `hipMemCreate` takes for device memory.
pub const hipMemAllocationTypePinned: hipMemAllocationType = 0x1;

/// `hipMemAllocationHandleType`.
pub type hipMemAllocationHandleType = c_int;
/// `hipMemHandleTypeNone`.
pub const hipMemHandleTypeNone: hipMemAllocationHandleType = 0x0;
/// `hipMemHandleTypePosixFileDescriptor`: an `int` file descriptor.
pub const hipMemHandleTypePosixFileDescriptor: hipMemAllocationHandleType = 0x1;

/// `hipMemLocationType`.
pub type hipMemLocationType = c_int;
/// `hipMemLocationTypeDevice`: `id` is a GPU ordinal.
pub const hipMemLocationTypeDevice: hipMemLocationType = 0x1;

/// `hipMemAccessFlags`.
pub type hipMemAccessFlags = c_int;
/// `hipMemAccessFlagsProtReadWrite`.
pub const hipMemAccessFlagsProtReadWrite: hipMemAccessFlags = 0x3;

/// `hipMemAllocationGranularity_flags`.
pub type hipMemAllocationGranularity_flags = c_int;
/// `hipMemAllocationGranularityMinimum`.
pub const hipMemAllocationGranularityMinimum: hipMemAllocationGranularity_flags = 0x0;
/// `hipMemAllocationGranularityRecommended`.
pub const hipMemAllocationGranularityRecommended: hipMemAllocationGranularity_flags = 0x1;

/// `hipMemLocation`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct hipMemLocation {
    /// `hipMemLocationType type`.
    pub r#type: hipMemLocationType,
    /// `int id`.
    pub id: c_int,
}

/// The anonymous `allocFlags` struct inside [`hipMemAllocationProp`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct hipMemAllocationPropFlags {
    /// `unsigned char compressionType`.
    pub compressionType: u8,
    /// `unsigned char gpuDirectRDMACapable`.
    pub gpuDirectRDMACapable: u8,
    /// `unsigned short usage`.
    pub usage: u16,
}

/// `hipMemAllocationProp`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct hipMemAllocationProp {
    /// `hipMemAllocationType type`.
    pub r#type: hipMemAllocationType,
    /// `hipMemAllocationHandleType requestedHandleType` (`requestedHandleTypes` in some releases).
    pub requestedHandleType: hipMemAllocationHandleType,
    /// `hipMemLocation location`.
    pub location: hipMemLocation,
    /// `void* win32HandleMetaData` (null on Linux).
    pub win32HandleMetaData: *mut c_void,
    /// `allocFlags`.
    pub allocFlags: hipMemAllocationPropFlags,
}

impl hipMemAllocationProp {
    /// Pinned device memory on GPU `ordinal`, exportable as a POSIX file descriptor.
    pub fn pinned_posix_fd(ordinal: c_int) -> Self {
        hipMemAllocationProp {
            r#type: hipMemAllocationTypePinned,
            requestedHandleType: hipMemHandleTypePosixFileDescriptor,
            location: hipMemLocation { r#type: hipMemLocationTypeDevice, id: ordinal },
            win32HandleMetaData: std::ptr::null_mut(),
            allocFlags: hipMemAllocationPropFlags::default(),
        }
    }
}

/// `hipMemAccessDesc`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct hipMemAccessDesc {
    /// `hipMemLocation location`.
    pub location: hipMemLocation,
    /// `hipMemAccessFlags flags`.
    pub flags: hipMemAccessFlags,
}

impl hipMemAccessDesc {
    /// Read-write access for GPU `ordinal`.
    pub fn read_write(ordinal: c_int) -> Self {
        hipMemAccessDesc {
            location: hipMemLocation { r#type: hipMemLocationTypeDevice, id: ordinal },
            flags: hipMemAccessFlagsProtReadWrite,
        }
    }
}

/// `hipMemGenericAllocationHandle_t`: `struct ihipMemGenericAllocationHandle*`, opaque.
pub type hipMemGenericAllocationHandle_t = *mut c_void;

/// `hipDeviceptr_t`: `void*`.
pub type hipDeviceptr_t = *mut c_void;

/// ROCm 7.1 (`hipRuntimeGetVersion` = major * 10,000,000 + minor * 100,000 + patch): from this release
/// `hipMemImportFromShareableHandle` takes the file descriptor itself as `(void*)(uintptr_t)fd`; older
/// releases take a pointer to the `int`.
pub const HIP_VERSION_FD_BY_VALUE: c_int = 70_100_000;

// Function pointer types, one per entry point, with the header's signatures.

/// `hipError_t hipGetDeviceCount(int* count)`.
pub type hipGetDeviceCount_t = unsafe extern "C" fn(count: *mut c_int) -> hipError_t;
/// `hipError_t hipSetDevice(int deviceId)`.
pub type hipSetDevice_t = unsafe extern "C" fn(device_id: c_int) -> hipError_t;
/// `hipError_t hipGetDevice(int* deviceId)`.
pub type hipGetDevice_t = unsafe extern "C" fn(device_id: *mut c_int) -> hipError_t;
/// `hipError_t hipRuntimeGetVersion(int* runtimeVersion)`.
pub type hipRuntimeGetVersion_t = unsafe extern "C" fn(version: *mut c_int) -> hipError_t;
/// `hipError_t hipDeviceGetAttribute(int* pi, hipDeviceAttribute_t attr, int deviceId)`.
pub type hipDeviceGetAttribute_t =
    unsafe extern "C" fn(value: *mut c_int, attr: hipDeviceAttribute_t, device_id: c_int) -> hipError_t;
/// `hipError_t hipDeviceGetPCIBusId(char* pciBusId, int len, int device)`.
pub type hipDeviceGetPCIBusId_t = unsafe extern "C" fn(bus_id: *mut c_char, len: c_int, device: c_int) -> hipError_t;
/// `hipError_t hipMalloc(void** ptr, size_t size)`.
pub type hipMalloc_t = unsafe extern "C" fn(ptr: *mut *mut c_void, size: usize) -> hipError_t;
/// `hipError_t hipFree(void* ptr)`.
pub type hipFree_t = unsafe extern "C" fn(ptr: *mut c_void) -> hipError_t;
/// `hipError_t hipMemcpy(void* dst, const void* src, size_t sizeBytes, hipMemcpyKind kind)`.
pub type hipMemcpy_t =
    unsafe extern "C" fn(dst: *mut c_void, src: *const c_void, size: usize, kind: hipMemcpyKind) -> hipError_t;
/// `hipError_t hipMemcpyPeer(void* dst, int dstDeviceId, const void* src, int srcDeviceId, size_t sizeBytes)`.
pub type hipMemcpyPeer_t = unsafe extern "C" fn(
    dst: *mut c_void,
    dst_device: c_int,
    src: *const c_void,
    src_device: c_int,
    size: usize,
) -> hipError_t;
/// `hipError_t hipPointerGetAttributes(hipPointerAttribute_t* attributes, const void* ptr)`.
pub type hipPointerGetAttributes_t =
    unsafe extern "C" fn(attributes: *mut hipPointerAttribute_t, ptr: *const c_void) -> hipError_t;
/// `hipError_t hipMemGetAddressRange(hipDeviceptr_t* pbase, size_t* psize, hipDeviceptr_t dptr)`.
pub type hipMemGetAddressRange_t =
    unsafe extern "C" fn(base: *mut hipDeviceptr_t, size: *mut usize, ptr: hipDeviceptr_t) -> hipError_t;
/// `hipError_t hipIpcGetMemHandle(hipIpcMemHandle_t* handle, void* devPtr)`.
pub type hipIpcGetMemHandle_t = unsafe extern "C" fn(handle: *mut hipIpcMemHandle_t, ptr: *mut c_void) -> hipError_t;
/// `hipError_t hipIpcOpenMemHandle(void** devPtr, hipIpcMemHandle_t handle, unsigned int flags)` (the
/// 64-byte handle is passed by value).
pub type hipIpcOpenMemHandle_t =
    unsafe extern "C" fn(ptr: *mut *mut c_void, handle: hipIpcMemHandle_t, flags: c_uint) -> hipError_t;
/// `hipError_t hipIpcCloseMemHandle(void* devPtr)`.
pub type hipIpcCloseMemHandle_t = unsafe extern "C" fn(ptr: *mut c_void) -> hipError_t;
/// `const char* hipGetErrorName(hipError_t hip_error)` (also `hipGetErrorString`).
pub type hipGetErrorName_t = unsafe extern "C" fn(error: hipError_t) -> *const c_char;
/// `hipError_t hipGetLastError(void)`: returns and clears the thread's last error.
pub type hipGetLastError_t = unsafe extern "C" fn() -> hipError_t;
/// `hipError_t hipMemCreate(hipMemGenericAllocationHandle_t* handle, size_t size, const hipMemAllocationProp*
/// prop, unsigned long long flags)`.
pub type hipMemCreate_t = unsafe extern "C" fn(
    handle: *mut hipMemGenericAllocationHandle_t,
    size: usize,
    prop: *const hipMemAllocationProp,
    flags: c_ulonglong,
) -> hipError_t;
/// `hipError_t hipMemExportToShareableHandle(void* shareableHandle, hipMemGenericAllocationHandle_t handle,
/// hipMemAllocationHandleType handleType, unsigned long long flags)`.
pub type hipMemExportToShareableHandle_t = unsafe extern "C" fn(
    shareable: *mut c_void,
    handle: hipMemGenericAllocationHandle_t,
    handle_type: hipMemAllocationHandleType,
    flags: c_ulonglong,
) -> hipError_t;
/// `hipError_t hipMemImportFromShareableHandle(hipMemGenericAllocationHandle_t* handle, void* osHandle,
/// hipMemAllocationHandleType shHandleType)`.
pub type hipMemImportFromShareableHandle_t = unsafe extern "C" fn(
    handle: *mut hipMemGenericAllocationHandle_t,
    os_handle: *mut c_void,
    handle_type: hipMemAllocationHandleType,
) -> hipError_t;
/// `hipError_t hipMemAddressReserve(void** ptr, size_t size, size_t alignment, void* addr, unsigned long long
/// flags)`.
pub type hipMemAddressReserve_t = unsafe extern "C" fn(
    ptr: *mut *mut c_void,
    size: usize,
    alignment: usize,
    addr: *mut c_void,
    flags: c_ulonglong,
) -> hipError_t;
/// `hipError_t hipMemMap(void* ptr, size_t size, size_t offset, hipMemGenericAllocationHandle_t handle,
/// unsigned long long flags)`.
pub type hipMemMap_t = unsafe extern "C" fn(
    ptr: *mut c_void,
    size: usize,
    offset: usize,
    handle: hipMemGenericAllocationHandle_t,
    flags: c_ulonglong,
) -> hipError_t;
/// `hipError_t hipMemSetAccess(void* ptr, size_t size, const hipMemAccessDesc* desc, size_t count)`.
pub type hipMemSetAccess_t =
    unsafe extern "C" fn(ptr: *mut c_void, size: usize, desc: *const hipMemAccessDesc, count: usize) -> hipError_t;
/// `hipError_t hipMemUnmap(void* ptr, size_t size)`.
pub type hipMemUnmap_t = unsafe extern "C" fn(ptr: *mut c_void, size: usize) -> hipError_t;
/// `hipError_t hipMemAddressFree(void* devPtr, size_t size)`.
pub type hipMemAddressFree_t = unsafe extern "C" fn(ptr: *mut c_void, size: usize) -> hipError_t;
/// `hipError_t hipMemRelease(hipMemGenericAllocationHandle_t handle)`.
pub type hipMemRelease_t = unsafe extern "C" fn(handle: hipMemGenericAllocationHandle_t) -> hipError_t;
/// `hipError_t hipMemGetAllocationGranularity(size_t* granularity, const hipMemAllocationProp* prop,
/// hipMemAllocationGranularity_flags option)`.
pub type hipMemGetAllocationGranularity_t = unsafe extern "C" fn(
    granularity: *mut usize,
    prop: *const hipMemAllocationProp,
    option: hipMemAllocationGranularity_flags,
) -> hipError_t;

#[cfg(test)]
mod tests {
    use std::mem::{align_of, offset_of, size_of};

    use super::*;

    #[test]
    fn ipc_handle_is_64_opaque_bytes() {
        assert_eq!(size_of::<hipIpcMemHandle_t>(), 64);
        assert_eq!(align_of::<hipIpcMemHandle_t>(), 1);
        let bytes: [u8; 64] = std::array::from_fn(|i| (i * 7) as u8);
        assert_eq!(hipIpcMemHandle_t::from_bytes(&bytes).to_bytes(), bytes);
    }

    #[test]
    fn pointer_attributes_follow_rocm6() {
        // enum type; int device; void* devicePointer; void* hostPointer; int isManaged; unsigned allocationFlags
        assert_eq!(size_of::<hipPointerAttribute_t>(), 32);
        assert_eq!(align_of::<hipPointerAttribute_t>(), 8);
        assert_eq!(offset_of!(hipPointerAttribute_t, r#type), 0);
        assert_eq!(offset_of!(hipPointerAttribute_t, device), 4);
        assert_eq!(offset_of!(hipPointerAttribute_t, devicePointer), 8);
        assert_eq!(offset_of!(hipPointerAttribute_t, hostPointer), 16);
        assert_eq!(offset_of!(hipPointerAttribute_t, isManaged), 24);
        assert_eq!(offset_of!(hipPointerAttribute_t, allocationFlags), 28);
        assert_eq!(
            [hipMemoryTypeUnregistered, hipMemoryTypeHost, hipMemoryTypeDevice, hipMemoryTypeManaged],
            [0, 1, 2, 3]
        );
        assert_eq!([hipMemoryTypeArray, hipMemoryTypeUnified], [10, 11]);
    }

    #[test]
    fn vmm_structs_match_the_header() {
        assert_eq!(size_of::<hipMemLocation>(), 8);
        assert_eq!(offset_of!(hipMemLocation, id), 4);
        assert_eq!(size_of::<hipMemAllocationPropFlags>(), 4);
        assert_eq!(offset_of!(hipMemAllocationPropFlags, usage), 2);
        assert_eq!(size_of::<hipMemAllocationProp>(), 32);
        assert_eq!(offset_of!(hipMemAllocationProp, r#type), 0);
        assert_eq!(offset_of!(hipMemAllocationProp, requestedHandleType), 4);
        assert_eq!(offset_of!(hipMemAllocationProp, location), 8);
        assert_eq!(offset_of!(hipMemAllocationProp, win32HandleMetaData), 16);
        assert_eq!(offset_of!(hipMemAllocationProp, allocFlags), 24);
        assert_eq!(size_of::<hipMemAccessDesc>(), 12);
        assert_eq!(offset_of!(hipMemAccessDesc, flags), 8);
        assert_eq!(size_of::<hipMemGenericAllocationHandle_t>(), size_of::<usize>());
        let p = hipMemAllocationProp::pinned_posix_fd(3);
        assert_eq!((p.r#type, p.requestedHandleType, p.location.r#type, p.location.id), (1, 1, 1, 3));
        let a = hipMemAccessDesc::read_write(2);
        assert_eq!((a.location.r#type, a.location.id, a.flags), (1, 2, 3));
    }

    #[test]
    fn enum_values_match_the_header() {
        assert_eq!(
            [hipMemcpyHostToHost, hipMemcpyHostToDevice, hipMemcpyDeviceToHost, hipMemcpyDeviceToDevice],
            [0, 1, 2, 3]
        );
        assert_eq!(hipMemcpyDefault, 4);
        assert_eq!(hipIpcMemLazyEnablePeerAccess, 1);
        assert_eq!(hipMemHandleTypePosixFileDescriptor, 1);
        assert_eq!(hipMemHandleTypeNone, 0);
        assert_eq!([hipMemAllocationGranularityMinimum, hipMemAllocationGranularityRecommended], [0, 1]);
        assert_eq!(hipDeviceAttributeVirtualMemoryManagementSupported, 89);
        assert_eq!(
            [hipErrorInvalidValue, hipErrorOutOfMemory, hipErrorNoDevice, hipErrorInvalidDevice, hipErrorNotSupported],
            [1, 2, 100, 101, 801]
        );
        assert_eq!(HIP_VERSION_FD_BY_VALUE, 7 * 10_000_000 + 100_000);
    }
}
