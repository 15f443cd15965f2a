//! GPU-to-GPU transports within a node over the vendors' IPC handles: `nvlink` (CUDA), `hip` (ROCm) and
//! `musa` (Moore Threads), one implementation written purely against [`mooncake_core::MemoryDevice`].
//!
//! # How a transfer works
//! - **Publication.** When GPU memory of the transport's device is registered, the device exports a handle
//!   for the allocation holding it ([`MemoryDevice::export_handle`]: a legacy IPC handle, a CUDA fabric
//!   handle, or a shareable file descriptor) and the buffer's descriptor entry carries it as upstream's
//!   `shm_name` (upper-case hex), plus our `ipc_kind`, `ipc_offset` and `ipc_alloc_length` (see [`section`]).
//!   Host memory and other vendors' memory are not published for these protocols.
//! - **Routing.** The engine routes a request here only for buffers that carry a handle
//!   ([`Transport::can_reach_buffer`]) of peers on this host (`ipc_host_id`, the kernel boot id; peers
//!   without it, upstream's, are trusted as upstream does). The declared cost model (about 100 GB/s, 8 us)
//!   makes the engine prefer it over tcp and shm for such buffers.
//! - **Import.** The first request to a buffer maps its handle ([`MemoryDevice::import_handle`]; for a
//!   shareable fd the exporter's descriptor is first copied with `pidfd_open` + `pidfd_getfd`) and caches the
//!   mapping per (segment, buffer, handle) until the peer's descriptor changes or the transport shuts down.
//!   A handle of memory that is gone, or of a process that exited, fails the request with the driver's typed
//!   error; nothing is cached then.
//! - **Copy.** Local memory of the same device: a device-to-device copy ([`MemoryDevice::copy_between`],
//!   NVLink or PCIe peer-to-peer). Host memory: the device's host copies straight from or into it. Another
//!   device's memory: staged through the host by `mooncake-raw`. Small requests run on the caller's thread;
//!   the rest on copy workers (`workers` option, or `MC_NVLINK_NUM_WORKERS`, `MC_HIP_NUM_STREAMS`,
//!   `MC_MUSA_NUM_WORKERS`; at most 16).
//!
//! # Limits
//! A peer that mapped a buffer keeps the mapping after the owner unregisters it, until it re-reads the owner's
//! descriptor. With shareable-fd and fabric handles the physical memory stays allocated while mapped, so a
//! late write lands in memory nobody reads; with legacy IPC handles the owner must not free memory peers may
//! still write (the same contract as upstream). The CPU never dereferences GPU memory here.
//!
//! What ran where: the transport logic (publication, routing, import cache, fd handles, copies) is tested on
//! CPU-only machines with a test device whose memory the CPU reaches only through its copy calls; the CUDA,
//! ROCm and MUSA devices themselves need their hardware (`scripts/gpu-check.sh`).

pub mod flavor;
mod imports;
pub mod section;
mod sys;
mod transport;

pub use flavor::{Flavor, HIP, MUSA, NVLINK};
pub use transport::GpuIpcTransport;

#[cfg(any(feature = "nvlink", feature = "hip", feature = "musa"))]
mod registration;

/// Call from a final binary to make sure the linker keeps this crate's registrations.
#[inline(never)]
pub fn link() {}

#[cfg(test)]
mod tests;
