//! Host DRAM memory device for mooncake-rs (Linux).
//!
//! [`HostDevice`] implements [`mooncake_core::MemoryDevice`] for ordinary host memory: it classifies
//! addresses as `cpu:N` by the NUMA node of their first page (asked with `move_pages`, touching
//! nothing), allocates page-aligned anonymous memory (any power-of-two alignment up to 4 GiB, huge
//! pages through `MAP_HUGETLB` or transparent huge pages, NUMA binding with `mbind`), copies with
//! bounds checks, and shares memfd-backed allocations ([`HostDevice::allocate_shared`]) with other
//! processes. [`ManagedBufferAllocator`] provides upstream's `allocate_managed_buffer` on top of it,
//! carving registered slabs with the pure [`SlabCarver`]; [`numa`] reads the NUMA topology.
//!
//! The crate registers itself in [`mooncake_core::registry`] as `host`; a final binary must reference
//! it (for example by calling [`link`]) or the linker drops the registration.
//!
//! ```
//! use mooncake_core::{AllocOptions, MemoryDevice};
//! use mooncake_device_host::HostDevice;
//! # fn main() -> mooncake_core::Result<()> {
//! let dev = HostDevice::new();
//! let a = dev.allocate(4096, &AllocOptions { alignment: 1 << 16, ..Default::default() })?;
//! assert_eq!(a.addr % (1 << 16), 0);
//! dev.copy_from_host(b"hello", &a, 100)?;
//! let mut out = [0u8; 5];
//! dev.copy_to_host(&a, 100, &mut out)?;
//! assert_eq!(&out, b"hello");
//! println!("{}", dev.classify(a.addr, a.len).unwrap()); // cpu:0 on a one-node machine
//! dev.free(&a)?;
//! assert!(dev.free(&a).is_err()); // a double free is a typed error
//! # Ok(()) }
//! ```

mod carver;
mod device;
mod managed;
pub mod numa;
mod sys;

use std::sync::Arc;

use mooncake_core::registry::{Availability, DeviceFactory};

pub use carver::{CarveError, SlabCarver};
pub use device::{
    AllocationInfo, DEVICE_NAME, FILE_HANDLE_KIND, HostDevice, MAX_ALIGNMENT, MEMFD_HANDLE_KIND, PageKind,
};
pub use managed::{ManagedBufferAllocator, ManagedBufferConfig, ManagedBufferStats};

mooncake_core::inventory::submit! {
    DeviceFactory {
        name: DEVICE_NAME,
        summary: "host DRAM: NUMA-aware, aligned and huge-page allocation, memfd sharing",
        probe: || Availability::Available,
        create: || Ok(Arc::new(HostDevice::new())),
    }
}

/// Does nothing; call it (or write `use mooncake_device_host as _;`) from a final binary so the
/// linker keeps this crate and its registry entry.
#[inline(never)]
pub fn link() {}
