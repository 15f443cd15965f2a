//! Moore Threads GPU memory device for mooncake-rs: the MUSA runtime, loaded at run time.
//!
//! [`MusaDevice`] implements [`mooncake_core::MemoryDevice`] for MUSA device memory. It loads `libmusart.so`
//! (then `libmusart.so.1`, then `/usr/local/musa/lib/libmusart.so`) with `libloading` once per process, and the
//! driver `libmusa.so` when present, so this crate builds and links on machines without the MUSA SDK; there a
//! [`probe`] says `libmusart.so not found (no MUSA runtime on this machine)` and [`MusaDevice::new`] returns
//! that as [`mooncake_core::Error::Unavailable`], never a panic or a link error.
//!
//! - Classification: `musaPointerGetAttributes` says whether an address is device memory and of which device
//!   (`musa:N`); host, registered-host and managed memory are not this device's. The whole range must lie inside
//!   one allocation (asked of the driver's `muMemGetAddressRange_v2`).
//! - Allocation: `musaMalloc` on `musa:N` (or the thread's current device for `*`), recorded so that unknown,
//!   stale and double frees are typed errors; [`MemoryDevice::hold`](mooncake_core::MemoryDevice::hold) defers the free, and a copy in progress
//!   keeps its memory too. Memory another allocator owns is found with [`MemoryDevice::allocation_of`](mooncake_core::MemoryDevice::allocation_of)
//!   (token 0) and re-checked with the runtime and driver before each use, so a freed buffer is an error.
//! - Copies: `musaMemcpy` host to device and back, `musaMemcpy` (`musaMemcpyDefault`) or `musaMemcpyPeer`
//!   between two allocations of this device ([`MemoryDevice::copy_between`](mooncake_core::MemoryDevice::copy_between)), each run with the allocation's
//!   device current and the calling thread's device restored afterwards (unless the thread had no context, so
//!   that none is created on a device it never used). Copies return once the bytes have landed.
//! - Sharing: handles of kind [`MUSA_IPC_HANDLE_KIND`] carry the 64-byte `musaIpcMemHandle_t`; importing opens
//!   it with `musaIpcOpenMemHandle` (lazy peer access) and freeing the import closes it.
//! - Topology: [`MemoryDevice::pci_address`](mooncake_core::MemoryDevice::pci_address) is `musaDeviceGetPCIBusId`, lower-cased.
//!
//! The ABI follows Moore Threads' `musa_runtime_api.h`, which mirrors CUDA's runtime API with a `musa` prefix;
//! where the headers were not at hand the CUDA ABI was mirrored (see the `sys` module and its layout tests).
//!
//! # What is tested where
//! Without a GPU (here and in CI): the loader's typed errors (library absent, symbol missing), the ABI layouts,
//! handle validation, the allocation records, error mapping, and the whole device against an in-process fake of
//! the runtime (allocation, classification, copies, copy_between, IPC, freed and foreign buffers, device
//! restore). The tests in `tests/gpu.rs` run against a real runtime and return early with "no MUSA device:
//! skipped" elsewhere. **This crate has not been run on Moore Threads hardware yet**: it was written and tested
//! on a machine without a GPU or the MUSA SDK.
//!
//! The crate registers itself in [`mooncake_core::registry`] as `musa`; a final binary must reference it (for
//! example by calling [`link`]) or the linker drops the registration.
//!
//! ```
//! use mooncake_core::{AllocOptions, MemoryDevice};
//! use mooncake_device_musa::MusaDevice;
//! # fn main() -> mooncake_core::Result<()> {
//! let dev = match MusaDevice::new() {
//!     Ok(dev) => dev,
//!     Err(e) => {
//!         println!("{e}"); // e.g. "unavailable: libmusart.so not found (no MUSA runtime on this machine)"
//!         return Ok(());
//!     }
//! };
//! let a = dev.allocate(1 << 20, &AllocOptions { location: "musa:0".parse()?, ..Default::default() })?;
//! dev.copy_from_host(b"hello", &a, 100)?;
//! let mut out = [0u8; 5];
//! dev.copy_to_host(&a, 100, &mut out)?;
//! assert_eq!(&out, b"hello");
//! assert_eq!(dev.classify(a.addr, a.len).unwrap().to_string(), "musa:0");
//! dev.free(&a)?;
//! assert!(dev.free(&a).is_err()); // a double free is a typed error
//! # Ok(()) }
//! ```

mod device;
mod error;
#[cfg(test)]
mod fake;
mod records;
mod sys;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use mooncake_core::registry::{Availability, DeviceFactory};

pub use device::{DEVICE_NAME, MUSA_IPC_HANDLE_KIND, MusaDevice};
pub use error::MusaError;
pub use sys::IPC_HANDLE_SIZE;

/// Whether MUSA memory is usable in this process: the runtime loads, has every entry point this crate uses, and
/// sees at least one device. Never panics.
pub fn probe() -> Availability {
    match sys::api().and_then(|api| api.device_count()) {
        Ok(0) => Availability::Unavailable(MusaError::NoDevice.to_string()),
        Ok(_) => Availability::Available,
        Err(e) => Availability::Unavailable(e.to_string()),
    }
}

mooncake_core::inventory::submit! {
    DeviceFactory {
        name: DEVICE_NAME,
        summary: "Moore Threads GPU memory: musaMalloc, musaMemcpy staging and peer copies, MUSA IPC handles",
        probe,
        create: || Ok(Arc::new(MusaDevice::new()?)),
    }
}

/// Does nothing; call it (or write `use mooncake_device_musa as _;`) from a final binary so the linker keeps
/// this crate and its registry entry.
#[inline(never)]
pub fn link() {}
