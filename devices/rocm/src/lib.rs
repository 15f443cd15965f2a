//! AMD GPU memory device for mooncake-rs, over the HIP runtime loaded at run time.
//!
//! [`RocmDevice`] implements [`mooncake_core::MemoryDevice`] for AMD GPU memory: it classifies addresses as
//! `hip:N` (`hipPointerGetAttributes`, checked against `hipMemGetAddressRange`), allocates with `hipMalloc`
//! (or, for shareable memory with `MC_USE_HIP_IPC=0` on GPUs with virtual memory management, with
//! `hipMemCreate` + reserve/map/set-access), copies between GPU and host memory with `hipMemcpy` and
//! between GPUs with `hipMemcpy`/`hipMemcpyPeer` ([`mooncake_core::MemoryDevice::copy_between`], for the GPU IPC
//! transport), and shares memory with other processes as [`HIP_IPC_HANDLE_KIND`] handles (the 64 bytes of a
//! `hipIpcMemHandle_t`) or [`HIP_POSIX_FD_HANDLE_KIND`] handles (a VMM allocation's POSIX file descriptor).
//! [`num_streams`] reads `MC_HIP_NUM_STREAMS` for the transport.
//!
//! `libamdhip64.so` is opened with `libloading` (a copy the process has loaded already first, then
//! `libamdhip64.so`, `.so.6`, `.so.7` and `/opt/rocm/lib/libamdhip64.so`), once per process; the C types
//! are declared by hand in [`ffi`] with their ROCm 6/7 layouts. Building needs no ROCm. On a machine without
//! it [`probe`] says `libamdhip64.so not found (no ROCm runtime on this machine)`, [`RocmDevice::new`]
//! returns `Error::Unavailable`, and nothing panics; a missing entry point is an error naming the library
//! and the symbol (the virtual memory management ones are optional: without them shareable memory comes
//! from `hipMalloc`).
//!
//! The crate registers itself in [`mooncake_core::registry`] as `rocm`; a final binary must reference it
//! (for example by calling [`link`]) or the linker drops the registration.
//!
//! # What was tested where
//! Everything that does not need a GPU runs in `cargo test` on any machine: the loader's typed errors
//! (missing library, a library without the HIP symbols), the struct layouts and enum values against the
//! header, handle validation, the environment parsing, and the allocation records (double free, stale
//! tokens, deferred release by holds). The device itself also runs there against a fake HIP runtime
//! (`src/fake.rs`: host memory tracked like device memory, VMM as memfd mappings) that checks pointers and
//! arguments as HIP's contract says: allocation, classification, copies, `copy_between`, holds, foreign
//! memory freed behind the device, IPC and file-descriptor export/import (both ways of passing the fd),
//! restoring the caller's current device, clearing HIP's sticky error. The tests in `tests/gpu.rs` (allocate, classify, copies,
//! `copy_between`, export and import in a child process, freed-buffer and bad-ordinal errors) return early
//! with `no AMD GPU: skipped` without a GPU. **This crate has not been run on AMD hardware yet**: the GPU
//! paths are written against ROCm 6/7's documented API but unverified.
//!
//! ```no_run
//! use mooncake_core::{AllocOptions, Location, MemoryDevice, MemoryKind};
//! use mooncake_device_rocm::RocmDevice;
//! # fn main() -> mooncake_core::Result<()> {
//! let dev = RocmDevice::new()?; // Error::Unavailable without ROCm or a GPU
//! let opts = AllocOptions { location: Location::Device(MemoryKind::Rocm, 0), ..Default::default() };
//! let a = dev.allocate(1 << 20, &opts)?;
//! dev.copy_from_host(b"hello", &a, 0)?;
//! let mut out = [0u8; 5];
//! dev.copy_to_host(&a, 0, &mut out)?;
//! assert_eq!(&out, b"hello");
//! assert_eq!(dev.classify(a.addr, a.len).unwrap().to_string(), "hip:0");
//! let handle = dev.export_handle(&a)?; // hip_ipc: send to another process, which calls import_handle
//! # drop(handle);
//! dev.free(&a)?;
//! # Ok(()) }
//! ```

mod device;
mod env;
mod error;
#[cfg(test)]
mod fake;
pub mod ffi;
mod handle;
mod records;
mod runtime;

use std::sync::Arc;

use mooncake_core::registry::DeviceFactory;

pub use device::{RocmDevice, probe};
pub use env::{
    DEFAULT_NUM_STREAMS, NUM_STREAMS_ENV, SharingMode, USE_HIP_IPC_ENV, num_streams, parse_num_streams,
    parse_use_hip_ipc,
};
pub use error::RocmError;
pub use handle::{HIP_IPC_HANDLE_KIND, HIP_POSIX_FD_HANDLE_KIND, validate_handle};
pub use runtime::LIBRARY_CANDIDATES;

/// Registry name and [`mooncake_core::MemoryDevice::name`] of this device.
pub const DEVICE_NAME: &str = "rocm";

mooncake_core::inventory::submit! {
    DeviceFactory {
        name: DEVICE_NAME,
        summary: "AMD GPU memory through libamdhip64 (loaded at run time): HIP IPC and shareable-fd sharing",
        probe,
        create: || Ok(Arc::new(RocmDevice::new()?)),
    }
}

/// Does nothing; call it (or write `use mooncake_device_rocm as _;`) from a final binary so the linker
/// keeps this crate and its registry entry.
#[inline(never)]
pub fn link() {}

#[cfg(test)]
mod tests {
    use mooncake_core::registry;

    #[test]
    fn registered_as_rocm() {
        super::link();
        let f = registry::devices().into_iter().find(|f| f.name == "rocm").expect("rocm is registered");
        let availability = (f.probe)();
        if !availability.is_available() {
            assert!((f.create)().is_err(), "create fails where probe does");
        }
    }
}
