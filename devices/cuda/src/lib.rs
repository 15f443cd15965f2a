//! NVIDIA GPU memory device for mooncake-rs (Linux).
//!
//! [`CudaDevice`] implements [`mooncake_core::MemoryDevice`] for GPU memory through the CUDA driver
//! API, loaded at run time (cudarc's `dynamic-loading`): a machine without `libcuda.so.1` builds and
//! links this crate, and [`probe`] and [`CudaDevice::new`] return a typed "unavailable" naming the
//! library instead of panicking. It
//! - classifies device pointers as `cuda:N` (`cuPointerGetAttributes`, `cuMemGetAddressRange`),
//!   leaving host, pinned and managed memory to the host device;
//! - allocates with `cuMemAlloc`, or, for shareable memory where the GPU supports virtual memory
//!   management, with `cuMemCreate` + `cuMemMap` (POSIX fd and, with `MC_USE_FABRIC`, fabric
//!   handle types);
//! - records its allocations, so stale, unknown and double frees are typed errors and
//!   [`MemoryDevice::hold`](mooncake_core::MemoryDevice::hold) defers a free; memory allocated by
//!   others (PyTorch) is checked with the driver before every use;
//! - copies to and from host memory (large pageable copies staged through pinned buffers, two
//!   chunks in flight) and between GPUs (`cuMemcpyDtoDAsync`, `cuMemcpyPeerAsync`), returning when
//!   the bytes have landed;
//! - shares memory as [`CUDA_IPC_HANDLE_KIND`], [`CUDA_POSIX_FD_HANDLE_KIND`] and
//!   [`CUDA_FABRIC_HANDLE_KIND`] handles, exports dmabufs for GPUDirect RDMA, and reports each
//!   GPU's PCI address;
//! - describes topology ([`topology`]): recorded `nvidia-smi topo -m` output, NVML, and the NICs
//!   nearest each GPU from sysfs.
//!
//! # Limits
//! - dmabuf export needs a CUDA 11.7 driver (`cuMemGetHandleForAddressRange` appeared there) and
//!   `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED`; older drivers still work, with
//!   [`DeviceInfo::dmabuf`] false and `export_dmabuf` returning `Unsupported`.
//! - Memory allocated by others is checked with the driver before each use, but can still be freed
//!   by its owner while a copy runs; the copy then fails in the driver (or, if the address was
//!   reused at once, touches the new allocation), as with any raw pointer.
//! - The bindings are cudarc's for CUDA 12.8: a `CUresult` a newer driver adds is outside the Rust
//!   enum they use.
//!
//! The crate registers itself in [`mooncake_core::registry`] as `cuda`; a final binary must
//! reference it (for example by calling [`link`]) or the linker drops the registration.
//!
//! # What was run where
//! The pure parts run everywhere and are unit-tested without a GPU: loader absence, handle
//! validation, allocation bookkeeping (tokens, stale and double frees, deferred frees), the
//! staging schedule (against a simulated asynchronous engine), dmabuf windows, error mapping, and
//! all of [`topology`] (fixtures of an 8-GPU NVLink box and a 2-GPU PCIe box, a sysfs tree built in
//! a temporary directory). The driver paths (allocation, copies, sharing between processes,
//! dmabuf, NVML) are written against the CUDA 12 driver API and have tests in `tests/gpu.rs` that
//! skip with "no CUDA device: skipped" where CUDA is unusable; they were compiled but **not run on
//! real hardware** in the session that wrote them.
//!
//! ```no_run
//! use mooncake_core::{AllocOptions, Location, MemoryDevice, MemoryKind};
//! use mooncake_device_cuda::CudaDevice;
//! # fn main() -> mooncake_core::Result<()> {
//! let dev = CudaDevice::new()?; // Err(Unavailable("libcuda.so.1 not found ...")) without a driver
//! let opts = AllocOptions { location: Location::Device(MemoryKind::Cuda, 0), ..Default::default() };
//! let a = dev.allocate(1 << 20, &opts)?;
//! dev.copy_from_host(b"hello", &a, 0)?;
//! let mut out = [0u8; 5];
//! dev.copy_to_host(&a, 0, &mut out)?;
//! assert_eq!(&out, b"hello");
//! assert_eq!(dev.classify(a.addr, a.len), Some(Location::Device(MemoryKind::Cuda, 0)));
//! dev.free(&a)?;
//! # Ok(()) }
//! ```

mod device;
mod driver;
mod handle;
mod records;
mod staging;
pub mod topology;

use std::sync::Arc;

use mooncake_core::registry::DeviceFactory;

pub use device::{
    CudaDevice, DEVICE_NAME, MEM_ALLOC_ALIGNMENT, USE_FABRIC_ENV, cuda_error, dmabuf_window, driver_info, probe,
};
pub use driver::{CudaError, DMABUF_MIN_DRIVER_VERSION, DeviceInfo, DriverInfo, LIBCUDA};
pub use handle::{CUDA_FABRIC_HANDLE_KIND, CUDA_IPC_HANDLE_KIND, CUDA_POSIX_FD_HANDLE_KIND};
pub use records::AllocationKind;
pub use staging::{CHUNK as STAGING_CHUNK, DIRECT_MAX as STAGING_DIRECT_MAX};

mooncake_core::inventory::submit! {
    DeviceFactory {
        name: DEVICE_NAME,
        summary: "NVIDIA GPU memory: CUDA driver loaded at run time, IPC/fd/fabric handles, dmabuf, NVML topology",
        probe,
        create: || Ok(Arc::new(CudaDevice::new()?)),
    }
}

/// Does nothing; call it (or write `use mooncake_device_cuda as _;`) from a final binary so the
/// linker keeps this crate and its registry entry.
#[inline(never)]
pub fn link() {}
