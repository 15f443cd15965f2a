//! The registry entries of the protocols this build carries (cargo features `nvlink`, `hip`, `musa`).

use std::sync::Arc;

use mooncake_core::registry::{self, Availability, TransportFactory};
use mooncake_core::{BackendConfig, MemoryKind, Result, Transport};

use crate::flavor::Flavor;
#[cfg(feature = "hip")]
use crate::flavor::HIP;
#[cfg(feature = "musa")]
use crate::flavor::MUSA;
#[cfg(feature = "nvlink")]
use crate::flavor::NVLINK;
use crate::transport::GpuIpcTransport;

/// Available when a linked memory device of `kind` probes usable here, else why not.
fn probe_for(flavor: &Flavor) -> Availability {
    let kind_name = |k: MemoryKind| match k {
        MemoryKind::Cuda => "cuda",
        MemoryKind::Rocm => "rocm",
        MemoryKind::Musa => "musa",
        _ => "?",
    };
    let wanted = kind_name(flavor.kind);
    match registry::devices().into_iter().find(|d| d.name == wanted) {
        None => Availability::Unavailable(format!(
            "the {} memory device is not linked into this build (enable the `{wanted}` feature)",
            flavor.vendor
        )),
        Some(d) => match (d.probe)() {
            Availability::Available => Availability::Available,
            Availability::Unavailable(why) => Availability::Unavailable(why),
        },
    }
}

fn create(flavor: &'static Flavor, config: &BackendConfig) -> Result<Arc<dyn Transport>> {
    Ok(Arc::new(GpuIpcTransport::new(flavor, config)))
}

#[cfg(feature = "nvlink")]
mooncake_core::inventory::submit! {
    TransportFactory {
        name: "nvlink",
        summary: "NVIDIA GPU to GPU within a node: CUDA IPC (or fabric) handles, copies over NVLink/PCIe",
        probe: || probe_for(&NVLINK),
        create: |c| create(&NVLINK, c),
    }
}

#[cfg(feature = "hip")]
mooncake_core::inventory::submit! {
    TransportFactory {
        name: "hip",
        summary: "AMD GPU to GPU within a node: HIP IPC handles or shareable fds",
        probe: || probe_for(&HIP),
        create: |c| create(&HIP, c),
    }
}

#[cfg(feature = "musa")]
mooncake_core::inventory::submit! {
    TransportFactory {
        name: "musa",
        summary: "Moore Threads GPU to GPU within a node: MUSA IPC handles",
        probe: || probe_for(&MUSA),
        create: |c| create(&MUSA, c),
    }
}
