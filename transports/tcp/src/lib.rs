//! TCP transport of mooncake-rs (protocol `"tcp"`), wire-compatible with upstream Mooncake
//! (docs/wire-formats.md section 4: 24-byte header, v1 and v2 framing, MCTV status words).
//!
//! Beyond upstream: persistent pooled connections (no port exhaustion), several lanes per peer,
//! large requests striped across lanes, many requests pipelined per lane, buffered header and
//! status I/O (no allocation per request), every listener bound exactly to the configured host,
//! and every remote access checked against registered memory before it is touched.
//!
//! Bytes are touched only through `mooncake-raw`: host memory in place, and memory of a device the CPU
//! cannot read (GPU memory), local or served to peers, staged through the owning device's copies.
//!
//! Settings (engine options or environment): `lanes` / `MC_TCP_LANES` (default 2),
//! `stripe_min` / `MC_TCP_STRIPE_MIN` (smallest stripe, default 256 KiB), `MC_TCP_PROTO=1`
//! (publish and speak v1 framing), `MC_TCP_CONNECT_TIMEOUT_MS` (default 5000), `MC_TCP_DIRECT=0` (no
//! caller-thread path for single requests up to 64 KiB and batches up to 256 such requests and 1 MiB), `MC_TCP_SERVER_SPIN_US` (server polls a
//! connection this long after answering before parking; default 200).
//!
//! ```no_run
//! // Link it (the `mooncake` facade does this for the `tcp` feature) and pick it by name:
//! use mooncake_transport_tcp as _;
//! let config = mooncake_core::EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols(["tcp"]);
//! ```

mod client;
mod direct;
pub mod section;
mod server;
mod staging;
pub mod wire;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use mooncake_core::registry::{Availability, TransportFactory};
use mooncake_core::{
    Access, BackendConfig, BlockingRequest, Capabilities, Error, FanIn, LocalRange, MemoryKind, MemoryKinds, Opcode,
    PeerEvents, PerfModel, PieceDone, RemoteSegment, Result, SegmentDescriptor, StripePlan, StripeRounding,
    TransferTask, Transport, TransportContext, sync,
};

use client::{LaneConfig, PeerInfo, PeerPool, Piece};
pub use section::TcpSection;

/// Protocol name.
pub const NAME: &str = "tcp";

/// Tunables of the TCP transport.
#[derive(Debug, Clone)]
pub struct TcpConfig {
    /// Connections per peer.
    pub lanes: usize,
    /// Requests at least twice this size are striped across lanes in pieces of at least this size.
    pub stripe_min: u64,
    /// Framing version to publish and to speak with peers that support it (1 or 2).
    pub proto_version: u32,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Run single small blocking requests on the calling thread (`MC_TCP_DIRECT`, default on).
    pub direct: bool,
}

impl TcpConfig {
    /// Reads options and `MC_TCP_*` environment variables.
    pub fn from_backend(config: &BackendConfig) -> Self {
        TcpConfig {
            lanes: config.get::<usize>("lanes", "MC_TCP_LANES").unwrap_or(2).clamp(1, 64),
            stripe_min: config.get::<u64>("stripe_min", "MC_TCP_STRIPE_MIN").unwrap_or(256 << 10).max(4096),
            proto_version: if config.get::<u32>("proto", "MC_TCP_PROTO") == Some(1) { 1 } else { 2 },
            connect_timeout: Duration::from_millis(
                config.get::<u64>("connect_timeout_ms", "MC_TCP_CONNECT_TIMEOUT_MS").unwrap_or(5000),
            ),
            direct: config.get::<u32>("direct", "MC_TCP_DIRECT") != Some(0),
        }
    }
}

struct Started {
    port: u16,
    server: tokio::task::JoinHandle<()>,
    runtime: tokio::runtime::Handle,
    events: Arc<dyn PeerEvents>,
}

/// The TCP transport.
pub struct TcpTransport {
    config: TcpConfig,
    caps: Capabilities,
    started: OnceLock<Started>,
    peers: RwLock<HashMap<String, Arc<PeerPool>>>,
    direct: direct::DirectPool,
}

impl TcpTransport {
    /// A transport with the given settings.
    pub fn new(config: TcpConfig) -> Self {
        let caps = Capabilities {
            read: true,
            write: true,
            notify: false,
            // GPU memory on either side is staged through its device (mooncake-raw), as upstream does with
            // cudaMemcpy.
            memory_kinds: MemoryKinds::of(&[MemoryKind::Host, MemoryKind::Cuda, MemoryKind::Rocm, MemoryKind::Musa]),
            reports_peer_failure: true,
            requires_local_registration: false,
            cross_process: true,
            same_host_only: false,
            max_request_size: 1 << 40,
            min_request_size: 1,
            optimal_request_size: 4 << 20,
            alignment: 1,
            max_batch_size: 0,
            model: PerfModel {
                bandwidth_bytes_per_sec: 3.0e9,
                latency: Duration::from_micros(25),
                per_request_overhead: Duration::from_micros(2),
            },
        };
        TcpTransport {
            config,
            caps,
            started: OnceLock::new(),
            peers: RwLock::new(HashMap::new()),
            direct: direct::DirectPool::default(),
        }
    }

    /// The bound data port (after start).
    pub fn data_port(&self) -> Option<u16> {
        self.started.get().map(|s| s.port)
    }

    /// Where and how to reach `target`: its published tcp section, connecting to the data host
    /// it publishes when usable (upstream's `tcp_data_host`), else to the segment's host.
    fn peer_info(&self, target: &RemoteSegment) -> Result<PeerInfo> {
        let section = target.descriptor.section::<TcpSection>()?.unwrap_or_default();
        let port = section.data_port.ok_or_else(|| {
            Error::unavailable(format!(
                "segment {:?} publishes no {}; it does not serve tcp",
                target.name,
                section::FIELD_DATA_PORT
            ))
        })?;
        Ok(PeerInfo {
            name: target.name.clone(),
            host: section.usable_data_host().unwrap_or(&target.host).to_string(),
            port,
            v2: self.config.proto_version >= 2 && section.version() >= 2,
        })
    }

    fn pool_for(&self, target: &RemoteSegment, started: &Started) -> Result<Arc<PeerPool>> {
        let info = self.peer_info(target)?;
        if let Some(p) = sync::read(&self.peers).get(&target.name) {
            if p.info == info {
                return Ok(p.clone());
            }
        }
        let mut peers = sync::write(&self.peers);
        if let Some(p) = peers.get(&target.name) {
            if p.info == info {
                return Ok(p.clone());
            }
        }
        let lane_config = LaneConfig { connect_timeout: self.config.connect_timeout };
        let pool =
            Arc::new(PeerPool::new(info, self.config.lanes, &lane_config, &started.runtime, started.events.clone()));
        peers.insert(target.name.clone(), pool.clone());
        Ok(pool)
    }
}

#[async_trait]
impl Transport for TcpTransport {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn start(&self, ctx: &TransportContext) -> Result<()> {
        let listener = server::bind(&ctx.bind_host).await?;
        let port = listener.local_addr()?.port();
        let server = ctx.runtime.spawn(server::serve(listener, ctx.regions.clone()));
        let started = Started { port, server, runtime: ctx.runtime.clone(), events: ctx.peer_events.clone() };
        if let Err(again) = self.started.set(started) {
            again.server.abort();
            return Err(Error::InvalidArgument("tcp transport started twice".into()));
        }
        tracing::debug!(host = %ctx.bind_host, port, "tcp data server listening");
        Ok(())
    }

    fn describe(&self, desc: &mut SegmentDescriptor) {
        desc.set_section(&TcpSection {
            data_port: self.data_port(),
            proto_version: Some(self.config.proto_version),
            data_host: None,
        });
    }

    fn submit(&self, target: &Arc<RemoteSegment>, tasks: Vec<TransferTask>) {
        let Some(started) = self.started.get() else {
            TransferTask::fail_all(tasks, &Error::NotInitialized("tcp transport not started".into()));
            return;
        };
        let pool = match self.pool_for(target, started) {
            Ok(p) => p,
            Err(e) => {
                TransferTask::fail_all(tasks, &e);
                return;
            }
        };
        for t in tasks {
            let length = t.length();
            let plan = StripePlan::new(length, pool.lanes(), self.config.stripe_min, StripeRounding::Down);
            if !plan.is_striped() {
                pool.send(
                    Piece {
                        opcode: t.opcode,
                        len: length,
                        local: t.local,
                        remote: t.remote_addr,
                        done: PieceDone::Whole(t.completion),
                        attempts: 0,
                    },
                    None,
                );
                continue;
            }
            // One page-aligned stripe per lane; the last one takes the remainder.
            let fan = Arc::new(FanIn::new(plan.stripes() as usize, length, t.completion));
            for p in plan {
                let done = PieceDone::Part(fan.clone());
                let Some(local) = t.local.sub(p.offset, p.len) else {
                    done.finish(Err(Error::InvalidArgument("stripe outside its request".into())));
                    continue;
                };
                pool.send(
                    Piece { opcode: t.opcode, len: p.len, local, remote: t.remote_addr + p.offset, done, attempts: 0 },
                    Some(p.stripe),
                );
            }
        }
    }

    fn transfer_blocking(
        &self,
        target: &Arc<RemoteSegment>,
        opcode: Opcode,
        local: &LocalRange,
        remote_addr: u64,
        timeout: Duration,
    ) -> Option<Result<u64>> {
        // Device memory is staged on the lanes; the caller-thread path moves host memory only.
        if local.len() > direct::DIRECT_MAX || !self.config.direct || !matches!(local.access(), Access::Host) {
            return None;
        }
        let started = self.started.get()?;
        let info = match self.peer_info(target) {
            Ok(i) => i,
            Err(e) => return Some(Err(e)),
        };
        let req = direct::Request { op: opcode, local, remote: remote_addr };
        let r = self.direct.transfer(&info, req, timeout, self.config.connect_timeout);
        if matches!(r, Err(Error::RemoteDisconnected { .. })) {
            started.events.peer_failed(&target.name);
        }
        Some(r)
    }

    fn transfer_blocking_batch(
        &self,
        target: &Arc<RemoteSegment>,
        opcode: Opcode,
        requests: &[BlockingRequest],
        timeout: Duration,
    ) -> Option<Vec<Result<u64>>> {
        let total = requests.iter().fold(0u64, |acc, r| acc.saturating_add(r.length()));
        if !self.config.direct
            || requests.len() > direct::BATCH_MAX_REQUESTS
            || total > direct::BATCH_MAX_BYTES
            || requests.iter().any(|r| r.length() > direct::DIRECT_MAX || !matches!(r.local.access(), Access::Host))
        {
            return None;
        }
        let started = self.started.get()?;
        let info = match self.peer_info(target) {
            Ok(i) => i,
            Err(e) => return Some(vec![Err(e); requests.len()]),
        };
        let results = self.direct.transfer_many(&info, opcode, requests, timeout, self.config.connect_timeout);
        if results.iter().any(|r| matches!(r, Err(Error::RemoteDisconnected { .. }))) {
            started.events.peer_failed(&target.name);
        }
        Some(results)
    }

    fn forget_peer(&self, segment_name: &str) {
        sync::write(&self.peers).remove(segment_name);
        self.direct.forget(segment_name);
    }

    async fn shutdown(&self) {
        if let Some(s) = self.started.get() {
            s.server.abort();
        }
        sync::write(&self.peers).clear();
        self.direct.clear();
    }
}

fn create(config: &BackendConfig) -> Result<Arc<dyn Transport>> {
    Ok(Arc::new(TcpTransport::new(TcpConfig::from_backend(config))))
}

mooncake_core::inventory::submit! {
    TransportFactory {
        name: NAME,
        summary: "TCP, wire-compatible with upstream Mooncake; pooled, multi-lane, pipelined",
        probe: || Availability::Available,
        create,
    }
}

/// Call from a final binary to make sure the linker keeps this crate's registration.
pub fn link() {}

#[cfg(test)]
mod tests;
