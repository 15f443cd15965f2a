//! How to start a [`super::StoreClient`].

use std::time::Duration;

use crate::error::Result;
use crate::types::ErrorCode;

/// Settings of a store client, with upstream's defaults (`MooncakeConfig`, docs/wire-formats.md section 7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// This node's name or IP, optionally `host:port` (`MOONCAKE_LOCAL_HOSTNAME`, default `localhost`). The
    /// transfer engine listens on it; in P2P mode its segment name becomes `host:<handshake port>`.
    pub local_hostname: String,
    /// Transfer-engine metadata: `P2PHANDSHAKE` (default), `http://host:port/metadata`, `etcd://...`.
    pub metadata_server: String,
    /// Primary transport (`tcp` by default; `rdma`, `libfabric`, ...; it must be linked into the binary).
    pub protocol: String,
    /// Devices for the transport (RDMA NIC names, comma-separated); passed to transports as the backend
    /// option `devices`. Empty = let the transport choose.
    pub device_name: String,
    /// The master's RPC address (`host:port`, default `127.0.0.1:50051`).
    pub master_server_addr: String,
    /// Bytes of host memory this client contributes to the store (mounted as one segment); 0 contributes
    /// nothing (a pure reader/writer). Default 3355443200 (3.125 GiB), as upstream.
    pub global_segment_size: u64,
    /// Bytes of registered staging memory for the bytes API (`put`/`get` with Rust slices); 0 = none (every
    /// bytes-API transfer then uses a temporary registration). Default 1 GiB, as upstream.
    pub local_buffer_size: u64,
    /// Bound on `setup`: connecting to the master is retried until it passes (default 10 s).
    pub setup_timeout: Duration,
    /// Bound on every master RPC (default 5 s).
    pub rpc_timeout: Duration,
    /// Bound on one read or write of object bytes, plus 1 ns per byte as the engine adds (default 5 s, or
    /// `MC_STORE_TRANSFER_TIMEOUT_MS`): a frozen peer fails the call after this instead of the engine's 30 s.
    pub transfer_timeout: Duration,
    /// How often the client pings the master (default 1 s; the master drops clients silent for 10 s).
    pub ping_interval: Duration,
    /// Keep the engine's automatic same-host transports (`shm`, `MC_AUTO_PROTOCOLS`) next to `protocol`
    /// (default true); false installs `protocol` only.
    pub same_host_transports: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            local_hostname: "localhost".into(),
            metadata_server: "P2PHANDSHAKE".into(),
            protocol: "tcp".into(),
            device_name: String::new(),
            master_server_addr: "127.0.0.1:50051".into(),
            global_segment_size: 3_355_443_200,
            local_buffer_size: 1 << 30,
            setup_timeout: Duration::from_secs(10),
            rpc_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(1),
            transfer_timeout: Duration::from_millis(
                std::env::var("MC_STORE_TRANSFER_TIMEOUT_MS").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(5000),
            ),
            same_host_transports: true,
        }
    }
}

impl ClientConfig {
    /// Checks names are non-empty, durations non-zero and sizes usable (a segment needs at least 8 bytes).
    pub fn validate(&self) -> Result<()> {
        let blank = |s: &str| s.trim().is_empty();
        let ok = !blank(&self.local_hostname)
            && !blank(&self.metadata_server)
            && !blank(&self.protocol)
            && !blank(&self.master_server_addr)
            && !self.setup_timeout.is_zero()
            && !self.rpc_timeout.is_zero()
            && !self.ping_interval.is_zero()
            && !self.transfer_timeout.is_zero()
            && (self.global_segment_size == 0 || self.global_segment_size >= crate::allocator::ALIGNMENT)
            && self.global_segment_size <= isize::MAX as u64
            && self.local_buffer_size <= isize::MAX as u64;
        if ok {
            Ok(())
        } else {
            tracing::warn!(config = ?self, "invalid store client configuration");
            Err(ErrorCode::InvalidParams.into())
        }
    }
}
