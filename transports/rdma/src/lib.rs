//! RDMA verbs transport of mooncake-rs (protocol `"rdma"`): one-sided RDMA READ/WRITE over
//! reliable-connected queue pairs, across every NIC of the node, handshake-compatible with
//! upstream Mooncake (docs/wire-formats.md sections 2 and 3).
//!
//! - **Descriptor** ([`segment`]): publishes `devices` (`name`, `lid`, `gid` in upstream's
//!   `fe:80:...` form), per-buffer `rkey`/`lkey` (one per device, in `devices` order) and the
//!   `priority_matrix`; decodes peers' descriptors with upstream's validity rules.
//! - **Topology** ([`topology`]): NICs, GPUs and NUMA nodes from sysfs; a GPU prefers the NICs
//!   behind its PCIe switch, a CPU node the NICs on that node. `MC_MS_FILTERS` limits the NICs.
//! - **Connection** ([`handshake`], [`qp`]): endpoints of `MC_NUM_QP_PER_EP` RC queue pairs per
//!   (local NIC, peer NIC), connected on first use through the peer's RPC socket (frame type 0,
//!   upstream JSON), RESET -> INIT -> RTR -> RTS with MTU `min(active, MC_MTU)`, the selected GID
//!   (`MC_GID_INDEX`, else the first RoCE v2 IPv4 GID, else index 0), `MC_IB_TIMEOUT` and
//!   `MC_IB_RETRY_CNT`. Endpoints live in a bounded LRU cache (`MC_MAX_EP_PER_CTX`) that evicts
//!   idle ones.
//! - **Data path** ([`slice`](mod@slice), [`transport`]): requests cut into `MC_SLICE_SIZE` slices spread
//!   over the NICs the matrices prefer for the local and the remote buffer; a slice that fails is
//!   retried on another rail (at most `MC_RETRY_CNT` times); a request completes when all of its
//!   slices have, or fails with a typed error once every rail failed. One thread per NIC polls its
//!   completion queue, pinned to the NIC's NUMA node, parked while nothing is in flight.
//! - **Memory** ([`memory`]): host memory with `ibv_reg_mr`; GPU memory with `ibv_reg_dmabuf_mr`
//!   when its memory device exports a dmabuf, else `ibv_reg_mr` on the device pointer
//!   (peer-memory drivers such as nvidia-peermem).
//!
//! ```no_run
//! // Link it (the `mooncake` facade does this for the `rdma` feature) and pick it by name:
//! mooncake_transport_rdma::link();
//! let config = mooncake_core::EngineConfig::new("10.0.0.1", "P2PHANDSHAKE").with_protocols(["rdma"]);
//! ```
//!
//! # Settings
//! Engine options or the upstream environment variables (see [`RdmaConfig`]): `MC_IB_PORT`,
//! `MC_GID_INDEX`, `MC_MAX_CQE_PER_CTX`, `MC_MAX_EP_PER_CTX`, `MC_NUM_QP_PER_EP`, `MC_MAX_SGE`,
//! `MC_MAX_WR`, `MC_MAX_INLINE`, `MC_MTU`, `MC_IB_TC`, `MC_IB_SL`, `MC_IB_TIMEOUT`,
//! `MC_IB_RETRY_CNT`, `MC_SLICE_SIZE`, `MC_RETRY_CNT`, `MC_MS_FILTERS`,
//! `MC_IB_PCI_RELAXED_ORDERING`.
//!
//! # Verbs binding: `sideway` 0.4
//! Chosen over `ibverbs` 0.9 because:
//! - **No build-time link against libibverbs.** sideway's `rdma-mummy-sys` compiles a small stub
//!   that `dlopen`s `libibverbs.so.1` at run time, so this crate builds, links and runs its
//!   tests on machines without rdma-core; `probe()` then answers `Unavailable` with the reason
//!   (docs/architecture.md#where-a-new-backend-goes: SDKs are loaded at run time, a missing library is a typed result). Both need
//!   cmake and libclang to build.
//! - **API coverage.** sideway exposes `ibv_reg_mr` on arbitrary addresses and
//!   `ibv_reg_dmabuf_mr` (GPUDirect through dmabuf), GID tables and types, and the raw `ibv_*`
//!   calls for RC queue pairs. `ibverbs` 0.9 only registers memory it allocates itself, has no
//!   dmabuf registration and a fixed connection handshake.
//! - **Licence.** sideway is MPL-2.0 (file-level copyleft: using it unmodified as a dependency
//!   places no obligation on this Apache-2.0 crate); rdma-mummy-sys is MIT.
//! - Queue pairs, completion queues, posting and polling use the `rdma-mummy-sys` functions
//!   directly: sideway's wrappers for those assert in `Drop`, panic on unknown enum values and
//!   allocate per post and per poll.
//!
//! # Peers and device memory come from the engine
//! - **Handshake.** Queue-pair numbers are exchanged through the engine's
//!   [`TransportContext::peers`](mooncake_core::TransportContext::peers), which resolves a segment
//!   name to its handshake socket in both P2P mode (the name is `host:port`) and metadata mode
//!   (`rpc_meta` keys), and reads descriptors of peers whose reply lacks `local_gid`.
//! - **GPU memory.** A region of device memory is registered with `ibv_reg_dmabuf_mr` on the
//!   dmabuf that the owning device among
//!   [`TransportContext::devices`](mooncake_core::TransportContext::devices) exports through
//!   [`MemoryDevice::export_dmabuf`](mooncake_core::MemoryDevice::export_dmabuf) (the range's fd and
//!   offset, as `cuMemGetHandleForAddressRange` gives); when it cannot, the pointer itself is
//!   registered (peer-memory modules such as nvidia-peermem).
//!
//! # What ran on hardware: nothing yet
//! No RDMA NIC on the build machines (`ibv_get_device_list` fails with ENOSYS there), so the
//! verbs calls in `verbs.rs` (device and port queries, CQ/QP creation and state changes, memory
//! registration, `ibv_post_send`, `ibv_poll_cq`) are compile-checked only. Unit tests cover
//! everything else: configuration parsing, GID text form and selection, device discovery
//! decisions and `probe()` on ENOSYS/ENODEV/empty lists, sysfs topology and the priority matrix
//! against fixture trees (`tests/fixtures`), descriptor and handshake encoding against literal
//! upstream JSON, the queue-pair state machine against a fake that enforces legal transitions,
//! slicing, rail choice and retries, the endpoint cache, memory registration bookkeeping, and the
//! whole transport (handshakes, slicing, posting, completion, retry on another NIC, all rails
//! failing, loopback, shutdown with requests in flight) over an in-memory fabric that moves real
//! bytes between buffers.

pub mod config;
pub mod discovery;
pub mod endpoint;
pub mod endpoint_cache;
pub mod fabric;
pub mod gid;
pub mod handshake;
pub mod memory;
pub mod qp;
pub mod segment;
pub mod slab;
pub mod slice;
pub mod topology;
pub mod transport;
pub mod verbs;

use std::sync::Arc;

use mooncake_core::registry::{Availability, TransportFactory};
use mooncake_core::{BackendConfig, Result, Transport};

pub use config::RdmaConfig;
pub use memory::device_dmabuf;
pub use transport::{NAME, RdmaTransport};
pub use verbs::VerbsProvider;

/// The RDMA transport over libibverbs.
pub fn verbs_transport(config: RdmaConfig) -> RdmaTransport<VerbsProvider> {
    RdmaTransport::with_provider(config, VerbsProvider)
}

fn probe() -> Availability {
    verbs::probe(&RdmaConfig::from_backend(&BackendConfig::default()))
}

fn create(config: &BackendConfig) -> Result<Arc<dyn Transport>> {
    Ok(Arc::new(verbs_transport(RdmaConfig::from_backend(config))))
}

mooncake_core::inventory::submit! {
    TransportFactory {
        name: NAME,
        summary: "RDMA verbs (RC queue pairs, multi-NIC, GPUDirect via dmabuf), upstream-compatible handshake",
        probe,
        create,
    }
}

/// Call from a final binary to make sure the linker keeps this crate's registration.
pub fn link() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_and_probe_never_panics() {
        let f = mooncake_core::registry::transport(NAME).expect("rdma is registered");
        assert_eq!(f.name, "rdma");
        // On the build machines this is Unavailable("no RDMA devices: ..."); on RDMA hosts it may
        // be available. Either way it returns.
        if let Availability::Unavailable(reason) = (f.probe)() {
            assert!(!reason.is_empty());
        }
        let t = (f.create)(&BackendConfig::default()).unwrap();
        assert_eq!(t.name(), "rdma");
        assert!(t.capabilities().requires_local_registration);
    }
}
