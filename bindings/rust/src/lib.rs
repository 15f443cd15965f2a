//! mooncake-rs: the KVCache-centric transfer engine of Mooncake, in Rust.
//!
//! This facade re-exports [`mooncake_core`] (and [`raw`], the one crate that turns addresses into bytes, with
//! [`HostBuffer`]: host memory a program registers without `unsafe`) and links the backends selected by cargo features
//! (`tcp`, `shm` and `http` by default; `rdma`, `libfabric`, `efa`, `etcd`, `redis`, the GPU ones `cuda`, `nvlink`,
//! `rocm`, `musa`, file segments `nvmeof`, CXL shared memory `cxl`, or `all`). Backends register themselves at link
//! time; call [`link_all`] once from a final binary so the linker keeps every enabled one, then pick them by
//! name at run time (`EngineConfig::with_protocols(["tcp"])`) or list them with [`backends`].
//!
//! ```no_run
//! use mooncake::{EngineConfig, Opcode, TransferEngine};
//! # fn main() -> mooncake::Result<()> {
//! mooncake::link_all();
//! let a = TransferEngine::new(EngineConfig::new("127.0.0.1", "P2PHANDSHAKE"))?;
//! let b = TransferEngine::new(EngineConfig::new("127.0.0.1", "P2PHANDSHAKE"))?;
//! // Memory the program owns, registered without `unsafe`: the engines hold it while it is registered.
//! // Every local range of a transfer must be registered too (raw addresses: the `unsafe`
//! // `register_memory`, or the `unsafe` `TransferEngine::unchecked` calls for unregistered TCP sources).
//! let src = mooncake::HostBuffer::from_vec(vec![42u8; 1 << 20]);
//! let dst = mooncake::HostBuffer::zeroed(1 << 20);
//! a.register_owned(src.owned(), "cpu:0")?;
//! b.register_owned(dst.owned(), "cpu:0")?;
//! let peer = b.local_segment_name().to_string();
//! let remote = a.first_buffer_address(&peer)?;
//! a.transfer_sync(&peer, Opcode::Write, src.addr(), remote, src.len())?;
//! assert_eq!(dst.to_vec(), vec![42u8; 1 << 20]);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub use mooncake_core::*;
pub use mooncake_raw as raw;
pub use mooncake_raw::HostBuffer;

#[cfg(feature = "cuda")]
pub use mooncake_device_cuda as device_cuda;
#[cfg(feature = "cxl")]
pub use mooncake_device_cxl as device_cxl;
pub use mooncake_device_host as device_host;
#[cfg(feature = "musa")]
pub use mooncake_device_musa as device_musa;
#[cfg(feature = "rocm")]
pub use mooncake_device_rocm as device_rocm;
#[cfg(feature = "etcd")]
pub use mooncake_metadata_etcd as metadata_etcd;
#[cfg(feature = "http")]
pub use mooncake_metadata_http as metadata_http;
pub use mooncake_metadata_p2p as metadata_p2p;
#[cfg(feature = "redis")]
pub use mooncake_metadata_redis as metadata_redis;
#[cfg(feature = "cxl")]
pub use mooncake_transport_cxl as transport_cxl;
#[cfg(any(feature = "nvlink", feature = "rocm", feature = "musa"))]
pub use mooncake_transport_gpu_ipc as transport_gpu_ipc;
#[cfg(any(feature = "libfabric", feature = "efa"))]
pub use mooncake_transport_libfabric as transport_libfabric;
#[cfg(feature = "nvmeof")]
pub use mooncake_transport_nvmeof as transport_nvmeof;
#[cfg(feature = "rdma")]
pub use mooncake_transport_rdma as transport_rdma;
#[cfg(feature = "shm")]
pub use mooncake_transport_shm as transport_shm;
#[cfg(feature = "tcp")]
pub use mooncake_transport_tcp as transport_tcp;

/// Cargo features of this build that add a backend, with the registry name each adds.
pub const ENABLED_BACKENDS: &[(&str, &str)] = &[
    #[cfg(feature = "tcp")]
    ("tcp", "tcp"),
    #[cfg(feature = "shm")]
    ("shm", "shm"),
    #[cfg(feature = "rdma")]
    ("rdma", "rdma"),
    #[cfg(feature = "libfabric")]
    ("libfabric", "libfabric"),
    #[cfg(feature = "efa")]
    ("efa", "efa"),
    #[cfg(feature = "http")]
    ("http", "http"),
    #[cfg(feature = "etcd")]
    ("etcd", "etcd"),
    #[cfg(feature = "redis")]
    ("redis", "redis"),
    #[cfg(feature = "cuda")]
    ("cuda", "cuda"),
    #[cfg(feature = "nvlink")]
    ("nvlink", "nvlink"),
    #[cfg(feature = "rocm")]
    ("rocm", "rocm"),
    #[cfg(feature = "rocm")]
    ("rocm", "hip"),
    #[cfg(feature = "musa")]
    ("musa", "musa"),
    #[cfg(feature = "nvmeof")]
    ("nvmeof", "nvmeof"),
    #[cfg(feature = "cxl")]
    ("cxl", "cxl"),
];

/// References every linked backend crate so the linker keeps their registrations.
/// Call once at start-up of a final binary (cheap; idempotent).
pub fn link_all() {
    mooncake_metadata_p2p::link();
    mooncake_device_host::link();
    #[cfg(feature = "tcp")]
    mooncake_transport_tcp::link();
    #[cfg(feature = "shm")]
    mooncake_transport_shm::link();
    #[cfg(feature = "rdma")]
    mooncake_transport_rdma::link();
    #[cfg(any(feature = "libfabric", feature = "efa"))]
    mooncake_transport_libfabric::link();
    #[cfg(feature = "http")]
    mooncake_metadata_http::link();
    #[cfg(feature = "etcd")]
    mooncake_metadata_etcd::link();
    #[cfg(feature = "redis")]
    mooncake_metadata_redis::link();
    #[cfg(feature = "cuda")]
    mooncake_device_cuda::link();
    #[cfg(feature = "rocm")]
    mooncake_device_rocm::link();
    #[cfg(feature = "musa")]
    mooncake_device_musa::link();
    #[cfg(any(feature = "nvlink", feature = "rocm", feature = "musa"))]
    mooncake_transport_gpu_ipc::link();
    #[cfg(feature = "nvmeof")]
    mooncake_transport_nvmeof::link();
    #[cfg(feature = "cxl")]
    {
        mooncake_device_cxl::link();
        mooncake_transport_cxl::link();
    }
}

/// What is linked and whether it works here (probe results).
pub fn backends() -> Vec<registry::BackendReport> {
    link_all();
    registry::probe_all()
}
