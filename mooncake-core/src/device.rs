//! The `MemoryDevice` trait: where memory lives (host DRAM, GPUs, CXL, NVMe).

use std::sync::Arc;

use crate::capabilities::DeviceCapabilities;
use crate::error::{Error, Result};
use crate::memory::OwnedMemory;
use crate::types::{Location, MemoryKind};

/// How to allocate.
#[derive(Debug, Clone, PartialEq)]
pub struct AllocOptions {
    /// Where (`cpu:1` for NUMA node 1, `cuda:0`, or `*` for the device's default).
    pub location: Location,
    /// Alignment in bytes (power of two; 0 means the device default).
    pub alignment: u64,
    /// Ask for huge pages (falls back to normal pages when none are available).
    pub huge_pages: bool,
    /// Make the memory exportable with [`MemoryDevice::export_handle`] (memfd, CUDA IPC, dmabuf).
    pub shareable: bool,
}

impl Default for AllocOptions {
    fn default() -> Self {
        AllocOptions { location: Location::Detect, alignment: 0, huge_pages: false, shareable: false }
    }
}

/// Memory obtained from a device; give it back with [`MemoryDevice::free`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    /// Address (device virtual address for GPUs).
    pub addr: u64,
    /// Usable length.
    pub len: u64,
    /// Where it lives.
    pub location: Location,
    /// Device-private token (mapping length, handle index, ...).
    pub token: u64,
}

/// [`SharingHandle::kind`] of a region of a file (an ordinary file, a `/dev/shm` file, a DAX or CXL memory
/// device file): `fd` is the open file, `data` the region's start offset as 8 little-endian bytes (a multiple of
/// the page size; empty for 0) and `len` its length. A host device that imports it maps the region shared, so
/// writes reach the file.
pub const FILE_HANDLE_KIND: &str = "file";

/// A handle another process can import to reach the same memory.
#[derive(Debug, Clone)]
pub struct SharingHandle {
    /// Handle kind: `memfd`, `cuda_ipc`, `dmabuf`, ...
    pub kind: String,
    /// Serialized handle bytes (e.g. a `cudaIpcMemHandle_t`).
    pub data: Vec<u8>,
    /// File descriptor for fd-based handles (sent over a Unix socket).
    pub fd: Option<Arc<std::os::fd::OwnedFd>>,
    /// Length of the shared range.
    pub len: u64,
}

/// A kind of memory: classifies addresses, allocates, copies to and from host, shares.
///
/// Copies are safe to call: an [`Allocation`] is plain data anyone can build, so an implementation checks
/// every allocation it is given against its own records (refusing one it never made, or already freed, with
/// a typed error) and every copy against the allocation's bounds. Memory of a device whose
/// [`DeviceCapabilities::host_accessible`] is false is never dereferenced by the CPU: transports move it
/// with [`MemoryDevice::copy_to_host`] and [`MemoryDevice::copy_from_host`] through a host staging buffer.
pub trait MemoryDevice: Send + Sync + 'static {
    /// Device driver name (`host`, `cuda`, ...).
    fn name(&self) -> &str;

    /// The kind of memory it manages.
    fn kind(&self) -> MemoryKind;

    /// Flags.
    fn capabilities(&self) -> DeviceCapabilities;

    /// Where `[addr, addr+len)` lives, if it is this device's memory.
    fn classify(&self, addr: u64, len: u64) -> Option<Location>;

    /// Allocates `len` (> 0) bytes.
    fn allocate(&self, len: u64, options: &AllocOptions) -> Result<Allocation>;

    /// Frees an allocation made by this device.
    fn free(&self, allocation: &Allocation) -> Result<()>;

    /// Copies `dst.len()` bytes from `allocation` at `offset` into host memory.
    fn copy_to_host(&self, allocation: &Allocation, offset: u64, dst: &mut [u8]) -> Result<()>;

    /// Copies `src` into `allocation` at `offset`.
    fn copy_from_host(&self, src: &[u8], allocation: &Allocation, offset: u64) -> Result<()>;

    /// Copies `len` bytes from `src` at `src_offset` to `dst` at `dst_offset` without passing through the host:
    /// both are allocations of this device, made by it or imported with [`MemoryDevice::import_handle`]
    /// (GPU to GPU within a node, over NVLink or PCIe peer access). Returns when the bytes have landed.
    /// Devices that cannot return `Unsupported`; GPU IPC transports need it.
    fn copy_between(
        &self,
        _src: &Allocation,
        _src_offset: u64,
        _dst: &Allocation,
        _dst_offset: u64,
        _len: u64,
    ) -> Result<()> {
        Err(Error::unsupported("copy_between", self.name()))
    }

    /// Keeps `allocation` valid until the returned [`OwnedMemory`] is dropped, even if [`MemoryDevice::free`]
    /// runs meanwhile (the memory is then given back when the hold ends). This is how memory the engine
    /// allocates itself is registered without `unsafe` (`TransferEngine::register_allocation`). Devices
    /// that cannot defer a free return `Unsupported`; their memory is registered by address, with `unsafe`.
    fn hold(&self, _allocation: &Allocation) -> Result<OwnedMemory> {
        Err(Error::unsupported("hold", self.name()))
    }

    /// The live allocation holding `[addr, addr+len)`, for memory registered by address: CPU transports
    /// copy such device memory through it. `None` when the device cannot tell.
    fn allocation_of(&self, _addr: u64, _len: u64) -> Option<Allocation> {
        None
    }

    /// Exports a handle other processes can import.
    fn export_handle(&self, _allocation: &Allocation) -> Result<SharingHandle> {
        Err(Error::unsupported("export_handle", self.name()))
    }

    /// Maps memory exported by another process. The returned allocation's `addr` is where the exported
    /// memory's first byte appears in this process; [`MemoryDevice::free`] of it unmaps it (the exporter's
    /// memory is untouched). An import of memory that is gone (freed, or its process exited) is an error of
    /// the device's driver, never a crash.
    fn import_handle(&self, _handle: &SharingHandle) -> Result<Allocation> {
        Err(Error::unsupported("import_handle", self.name()))
    }

    /// Attaches to the area called `name` that every process mapping this device shares: the first caller
    /// (in any process) reserves `len` bytes under the name (`0`: the largest free range), later callers get a
    /// view of the same bytes whatever `len` they pass (compare the returned length with what you need). The
    /// area outlives the processes that attached it; [`MemoryDevice::free`] of the view leaves it reserved.
    /// [`MemoryDevice::export_handle`] of the view tells where it lies (for a file region, its offset). The
    /// store places objects in such an area when clients use a shared memory pool (CXL).
    fn attach_named(&self, _name: &str, _len: u64) -> Result<Allocation> {
        Err(Error::unsupported("attach_named (a named area shared between processes)", self.name()))
    }

    /// Faults in every page of `allocation` now, so that first writes into it (by this process or
    /// by peers through a transport) run at memory speed instead of paying a page fault each. A
    /// hint: contents are unchanged and it is safe while the memory is in use; devices for which it
    /// means nothing do nothing. May take about a second per GiB: call it off the hot path.
    /// Implementations keep the memory valid for the whole call even if `free` runs concurrently.
    fn prefault(&self, _allocation: &Allocation) -> Result<()> {
        Ok(())
    }

    /// The PCI address (`0000:04:00.0`, lower case) of the device behind `location` (`cuda:1`), so that
    /// transports can pick the NIC closest to it (upstream's topology matrix). `None` when unknown or not a
    /// PCI device (host memory).
    fn pci_address(&self, _location: &Location) -> Option<String> {
        None
    }

    /// A dmabuf covering `[addr, addr+len)` of this device's memory (any range the device
    /// classifies, not only whole allocations), for NICs that register device memory through
    /// dmabuf (GPUDirect RDMA with `ibv_reg_dmabuf_mr`). Devices without dmabuf support return
    /// `Unsupported`; callers then fall back to registering the pointer itself.
    fn export_dmabuf(&self, _addr: u64, _len: u64) -> Result<DmabufExport> {
        Err(Error::unsupported("export_dmabuf", self.name()))
    }
}

/// A dmabuf exported by [`MemoryDevice::export_dmabuf`].
#[derive(Debug)]
pub struct DmabufExport {
    /// The dmabuf file descriptor (owned: the importer keeps it open as long as it needs it).
    pub fd: std::os::fd::OwnedFd,
    /// Offset of the requested range's first byte inside the dmabuf.
    pub offset: u64,
}

/// Checks that `[offset, offset+len)` lies inside `allocation` (for device implementations).
pub fn check_bounds(allocation: &Allocation, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= allocation.len => Ok(()),
        _ => Err(Error::AddressNotRegistered {
            addr: allocation.addr.wrapping_add(offset),
            len,
            context: format!("outside allocation of {} bytes", allocation.len),
        }),
    }
}
