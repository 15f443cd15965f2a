//! CXL shared memory device for mooncake-rs (Linux).
//!
//! [`CxlDevice`] implements [`mooncake_core::MemoryDevice`] over one region of CXL memory: a DAX character device
//! (`/dev/dax0.0`) or a file, named by `MC_CXL_DEV_PATH` (upstream's `CXL_DEV_PATH` also works), of
//! `MC_CXL_DEV_SIZE` (`CXL_DEV_SIZE`) bytes, or, when that is unset, the DAX device's sysfs size or the file's
//! length. The region is mapped `MAP_SHARED` once per process ([`CxlDevice::shared`]); addresses inside it are
//! `cxl:0`. The CPU reads and writes it directly (`host_accessible`).
//!
//! Allocation is shared by every process mapping the device, on this host and, for CXL 3.x shared memory, on
//! others: the region starts with a header ([`layout`]) holding an allocation table, a table of owners (processes
//! and engines) and the publication table the `cxl` transport checks accesses against, changed under a lock that
//! works across processes of a host (an open-file-description lock on the device file) and across hosts (a
//! compare-and-swap lock word in the header, which assumes the device keeps atomics coherent). See [`region`]. A
//! region whose header does not match what this process asks for (size, granularity, table sizes, version) is a
//! typed [`CxlError`] naming the path and the field, never reused silently; neither is one that starts with
//! something other than our header (`MC_CXL_FORMAT=1` initializes such a region).
//!
//! Entries of processes of this host that died are reclaimed by the next process that takes the lock; a process of
//! another host that dies leaves its entries (and, if it held it, the lock) behind: see docs/cxl.md.
//!
//! The crate registers itself in [`mooncake_core::registry`] as `cxl` (probe: the environment names a region that
//! opens); a final binary must reference it (for example by calling [`link`]).
//!
//! ```no_run
//! use mooncake_core::{AllocOptions, MemoryDevice};
//! use mooncake_device_cxl::{CxlConfig, CxlDevice};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A file-backed region (a DAX device works the same way); the header is written on first use.
//! let file = std::env::temp_dir().join("cxl-region");
//! std::fs::File::create(&file)?.set_len(64 << 20)?;
//! let dev = CxlDevice::open(&CxlConfig::new(&file))?;
//! let a = dev.allocate(1 << 20, &AllocOptions::default())?;
//! dev.copy_from_host(b"hello", &a, 0)?;
//! println!("{} at offset {:#x}", dev.classify(a.addr, a.len).unwrap(), a.addr - dev.region().base());
//! dev.free(&a)?;
//! # Ok(()) }
//! ```

mod config;
mod device;
mod error;
pub mod flush;
pub mod layout;
pub mod region;
mod sys;

use std::sync::Arc;

use mooncake_core::registry::{Availability, DeviceFactory};

pub use config::{
    CxlConfig, DEFAULT_MAX_ALLOCATIONS, DEFAULT_MAX_BUFFERS, DEFAULT_MAX_OWNERS, ENV_FLUSH, ENV_FORMAT,
    ENV_GRANULARITY, ENV_LOCK_TIMEOUT_MS, ENV_OWNER_TIMEOUT_MS, ENV_PATH, ENV_SIZE, ENV_TABLES, parse_bytes,
};
pub use device::{CxlDevice, DEVICE_NAME, location};
pub use error::CxlError;
pub use mooncake_core::device::FILE_HANDLE_KIND;
pub use region::{MAX_ALIGNMENT, OwnerKind, OwnerRef, OwnerStatus, Publication, Refusal, Region, SlotAccess};
pub use sys::{Identity, PidWatch};

mooncake_core::inventory::submit! {
    DeviceFactory {
        name: DEVICE_NAME,
        summary: "CXL shared memory: one MAP_SHARED region (MC_CXL_DEV_PATH), allocation shared across processes",
        probe: || match device::probe() {
            Ok(()) => Availability::Available,
            Err(why) => Availability::Unavailable(why),
        },
        create: || Ok(CxlDevice::shared()? as Arc<dyn mooncake_core::MemoryDevice>),
    }
}

/// Does nothing; call it (or write `use mooncake_device_cxl as _;`) from a final binary so the linker keeps this
/// crate and its registry entry.
#[inline(never)]
pub fn link() {}
