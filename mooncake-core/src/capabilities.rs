//! What a transport or device can do, as flags and numbers the engine and the conformance suite read.

use std::time::Duration;

use crate::types::MemoryKinds;

/// A simple cost model: `latency + bytes / bandwidth`, plus a per-request overhead (UCX style).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerfModel {
    /// Sustained bandwidth of one peer pair, bytes per second.
    pub bandwidth_bytes_per_sec: f64,
    /// One-way latency of a small request.
    pub latency: Duration,
    /// CPU cost per request that batching cannot hide.
    pub per_request_overhead: Duration,
}

impl PerfModel {
    /// Estimated time to move `bytes` in one request.
    pub fn estimate(&self, bytes: u64) -> Duration {
        let secs = bytes as f64 / self.bandwidth_bytes_per_sec.max(1.0);
        self.latency + self.per_request_overhead + Duration::from_secs_f64(secs)
    }
}

/// Flags and limits a transport declares. The conformance suite gates its tests on these.
#[derive(Debug, Clone, PartialEq)]
pub struct Capabilities {
    /// Supports one-sided reads of remote memory.
    pub read: bool,
    /// Supports one-sided writes into remote memory.
    pub write: bool,
    /// Can carry notifications itself (besides the handshake socket the engine always has).
    pub notify: bool,
    /// Kinds of local and remote memory it can touch.
    pub memory_kinds: MemoryKinds,
    /// Reports a dead peer as a typed error on in-flight requests (instead of hanging).
    pub reports_peer_failure: bool,
    /// Local buffers must be registered before use (RDMA, shm). The engine's safe calls check every local
    /// range against registered memory whatever the transport; without this flag a transport also accepts
    /// an unregistered range that the caller of an `unsafe` entry point vouched for (TCP, as upstream).
    pub requires_local_registration: bool,
    /// Works between different processes (false for an in-process loopback).
    pub cross_process: bool,
    /// Only reaches peers on the same host (shared memory, CUDA IPC).
    pub same_host_only: bool,
    /// Largest single request; larger ones are rejected with InvalidArgument.
    pub max_request_size: u64,
    /// Smallest request (normally 1).
    pub min_request_size: u64,
    /// Size at which the transport reaches most of its bandwidth.
    pub optimal_request_size: u64,
    /// Required alignment of addresses and lengths (1 = none).
    pub alignment: u64,
    /// Largest number of requests in one submission (0 = unlimited).
    pub max_batch_size: usize,
    /// Cost model used to choose between transports.
    pub model: PerfModel,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            read: true,
            write: true,
            notify: false,
            memory_kinds: MemoryKinds::HOST,
            reports_peer_failure: true,
            requires_local_registration: false,
            cross_process: true,
            same_host_only: false,
            max_request_size: u64::MAX,
            min_request_size: 1,
            optimal_request_size: 1 << 20,
            alignment: 1,
            max_batch_size: 0,
            model: PerfModel {
                bandwidth_bytes_per_sec: 1e9,
                latency: Duration::from_micros(20),
                per_request_overhead: Duration::from_micros(1),
            },
        }
    }
}

/// Flags a memory device declares.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceCapabilities {
    /// Host code may dereference the memory directly (host DRAM, CXL, managed memory).
    pub host_accessible: bool,
    /// Can export sharing handles for other processes (CUDA IPC, dmabuf, memfd).
    pub export_handles: bool,
    /// Can allocate on huge pages.
    pub huge_pages: bool,
    /// Number of devices (GPUs, NUMA nodes) this driver sees.
    pub device_count: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_grows_with_size() {
        let m = Capabilities::default().model;
        assert!(m.estimate(1 << 30) > m.estimate(4096));
        assert!(m.estimate(0) >= m.latency);
    }
}
