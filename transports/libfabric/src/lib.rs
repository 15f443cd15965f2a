//! libfabric transports of mooncake-rs: protocol `efa` (AWS Elastic Fabric Adapter, provider
//! `efa`) and protocol `libfabric` (any provider with reliable-datagram endpoints and one-sided
//! RMA: `tcp;ofi_rxm`, `shm`, `verbs;ofi_rxm`, `cxi`, ...).
//!
//! Every transfer is a one-sided `fi_write` / `fi_read` into memory the target registered: the
//! target's CPU only drives its provider's progress. What a peer needs is published in the
//! segment descriptor (see [`desc`]): the endpoint address of every rail (`efa_addr` for `efa`,
//! `libfabric_addr` for `libfabric`, hex of `fi_getname`), the provider, and per buffer the memory
//! key of every rail (`<protocol>_rkey`). Peers enter the address vector on first use.
//!
//! - **Rails**: every domain (NIC) of the provider is a rail (socket providers: the interface of
//!   the engine's bind address). Requests of at least twice `stripe_min` are striped across rails;
//!   smaller ones rotate over them. Operations above the provider's `max_msg_size` are split.
//! - **Progress**: a dedicated thread per transport instance posts, polls the completion queues
//!   and finishes requests; it also serves peers' one-sided accesses for manual-progress
//!   providers. It busy-polls while work is outstanding and for `spin_us` after any activity, then
//!   sleeps on the CQ's wait descriptor (tcp) or takes naps growing to `idle_us` (shm, where a
//!   counter of peers' accesses, `FI_RMA_EVENT`, tells a passive target that it is being served).
//! - **Failures**: a range outside the target's published buffers is refused before posting
//!   (`AddressNotRegistered`); a target that refuses a key or range yields `RemoteRejected`; a
//!   connection loss is retried while the provider reconnects, then reported as
//!   `RemoteDisconnected`, as is a peer that completes nothing within `timeout_ms`, or at once a
//!   same-host peer whose process is gone (its pid is published). Every request is finished
//!   exactly once; nothing waits forever.
//!
//! Settings: see [`FabricConfig`] (`MC_LIBFABRIC_PROVIDER`, default `tcp;ofi_rxm`, and more).
//!
//! Caveats of the providers, not of this crate: `shm` moves data with cross-memory attach and does
//! not check keys or ranges at the target, so only this transport's check against the target's
//! published descriptor guards it (a stale descriptor is not caught); `tcp` drops the connection
//! on a refused access, failing operations in flight to that peer until it reconnects.
//!
//! ```no_run
//! // Link it (the `mooncake` facade does this for its `libfabric` feature) and pick it by name:
//! mooncake_transport_libfabric::link();
//! // MC_LIBFABRIC_PROVIDER=shm selects the provider of the `libfabric` protocol.
//! let config = mooncake_core::EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols(["libfabric"]);
//! ```

mod config;
mod core;
pub mod desc;
mod fabric;
mod local;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use mooncake_core::registry::{Availability, TransportFactory};
use mooncake_core::{
    BackendConfig, BufferDesc, Capabilities, Error, FanIn, MemoryKinds, Opcode, PerfModel, PieceDone, RegionGuard,
    RegionTable, RemoteSegment, Result, SegmentDescriptor, StripePlan, StripeRounding, TransferTask, Transport,
    TransportContext, sync,
};

pub use config::{DEFAULT_PROVIDER, EFA_PROVIDER, FabricConfig};

use crate::core::{Core, Op, Peer};
use crate::desc::RemotePeer;

/// Protocol name of the EFA transport.
pub const EFA: &str = "efa";
/// Protocol name of the generic libfabric transport.
pub const LIBFABRIC: &str = "libfabric";

/// A libfabric transport (`efa` or `libfabric`).
pub struct LibfabricTransport {
    protocol: &'static str,
    config: FabricConfig,
    caps: Capabilities,
    core: OnceLock<Arc<Core>>,
    /// The engine's registered memory (local ranges must lie in it).
    regions: OnceLock<Arc<RegionTable>>,
    /// Regions registered with the rails, kept registered until unregistered here.
    held: Mutex<HashMap<u64, RegionGuard>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    peers: RwLock<HashMap<String, Arc<Peer>>>,
    node: String,
}

impl std::fmt::Debug for LibfabricTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibfabricTransport")
            .field("protocol", &self.protocol)
            .field("config", &self.config)
            .field("rails", &self.rails())
            .finish_non_exhaustive()
    }
}

/// The declared capabilities for a configuration (no fabric object is opened).
pub fn capabilities_for(config: &FabricConfig) -> Capabilities {
    let base = config.provider.split(';').next().unwrap_or_default();
    let (bandwidth, latency) = match base {
        "efa" => (12.0e9, Duration::from_micros(15)),
        "shm" | "sm2" => (8.0e9, Duration::from_micros(3)),
        "verbs" | "cxi" | "opx" | "psm3" => (12.0e9, Duration::from_micros(5)),
        _ => (2.0e9, Duration::from_micros(20)),
    };
    Capabilities {
        read: true,
        write: true,
        notify: false,
        memory_kinds: MemoryKinds::HOST,
        reports_peer_failure: true,
        requires_local_registration: true,
        cross_process: true,
        same_host_only: config.same_host_only(),
        max_request_size: 1 << 40,
        min_request_size: 1,
        optimal_request_size: 4 << 20,
        alignment: 1,
        max_batch_size: 0,
        model: PerfModel {
            bandwidth_bytes_per_sec: bandwidth,
            latency,
            per_request_overhead: Duration::from_micros(1),
        },
    }
}

impl LibfabricTransport {
    /// A transport for `protocol` ([`EFA`] or [`LIBFABRIC`]) with `config`. Opens nothing until
    /// [`Transport::start`].
    pub fn new(protocol: &str, config: FabricConfig) -> Result<Self> {
        let protocol = match protocol {
            EFA => EFA,
            LIBFABRIC => LIBFABRIC,
            other => return Err(Error::InvalidArgument(format!("{other:?} is not a libfabric protocol"))),
        };
        Ok(LibfabricTransport {
            protocol,
            caps: capabilities_for(&config),
            config,
            core: OnceLock::new(),
            regions: OnceLock::new(),
            held: Mutex::new(HashMap::new()),
            thread: Mutex::new(None),
            peers: RwLock::new(HashMap::new()),
            node: desc::hostname(),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &FabricConfig {
        &self.config
    }

    /// Domain name of every rail (after start; empty before).
    pub fn rails(&self) -> Vec<String> {
        self.core.get().map(|c| c.rails.iter().map(|r| r.domain.clone()).collect()).unwrap_or_default()
    }

    /// Endpoint address of every rail, as published (hex; after start).
    pub fn addresses(&self) -> Vec<String> {
        self.core.get().map(|c| c.publication.addrs.iter().map(|a| desc::to_hex(a)).collect()).unwrap_or_default()
    }

    fn started(&self) -> Result<&Arc<Core>> {
        let core =
            self.core.get().ok_or_else(|| Error::NotInitialized(format!("{} transport not started", self.protocol)))?;
        if core.is_closed() {
            return Err(Error::NotInitialized(format!("{} transport was shut down", self.protocol)));
        }
        Ok(core)
    }

    fn parse_peer(&self, core: &Core, target: &RemoteSegment) -> Result<RemotePeer> {
        let info = RemotePeer::parse(&core.fields, &target.descriptor).map_err(Error::unavailable)?;
        if info.provider != self.config.provider {
            return Err(Error::unavailable(format!(
                "segment {:?} uses libfabric provider {:?}, this engine {:?}",
                target.name, info.provider, self.config.provider
            )));
        }
        if self.caps.same_host_only && info.node != self.node {
            return Err(Error::unavailable(format!(
                "segment {:?} is on host {:?}; provider {} only reaches this host ({:?})",
                target.name, info.node, self.config.provider, self.node
            )));
        }
        Ok(info)
    }

    fn peer(&self, core: &Core, target: &Arc<RemoteSegment>) -> Result<Arc<Peer>> {
        if let Some(p) = sync::read(&self.peers).get(&target.name) {
            if Arc::ptr_eq(&p.segment, target) {
                return Ok(p.clone());
            }
        }
        let info = self.parse_peer(core, target)?;
        let pid = desc::same_namespace_pid(&info, &self.node, &core.publication.pid);
        let other_process = desc::is_other_process(&info, &self.node, &core.publication.pid);
        let peer = Arc::new(Peer::new(target.clone(), info, &self.config.provider, pid, other_process));
        sync::write(&self.peers).insert(target.name.clone(), peer.clone());
        Ok(peer)
    }

    /// Plans one task into operations, grouped per rail into `per_rail`.
    fn plan_task(&self, core: &Core, peer: &Arc<Peer>, t: TransferTask, per_rail: &mut [Vec<Op>]) {
        // The NIC reads and writes the local range: it must lie in registered memory (the task's own region,
        // or, for a range the engine's caller vouched for, a lookup), which each operation holds until done.
        let checked = match self.regions.get() {
            Some(regions) => t.local.registered_in(regions, "local buffer of a libfabric transfer").map(|_| ()),
            None => Err(Error::NotInitialized(format!("{} transport not started", self.protocol))),
        };
        if let Err(e) = checked {
            t.completion.finish(Err(e));
            return;
        }
        let length = t.length();
        let Some(buf) = peer.info.find(t.remote_addr, length) else {
            t.completion.finish(Err(Error::AddressNotRegistered {
                addr: t.remote_addr,
                len: length,
                context: format!(
                    "not inside a buffer that segment {} registered with {} (checked before posting)",
                    peer.name, self.protocol
                ),
            }));
            return;
        };
        let rails = core.rails.len().max(1);
        let first_rail = core.next_rail() % rails;
        let remote_rails = peer.addrs.len().max(1);
        let max_msg = core.rails.iter().map(|r| r.max_msg).min().unwrap_or(u64::MAX);
        // Striped across rails when large, then cut so that no operation exceeds max_msg.
        let plan = StripePlan::new(length, rails, self.config.stripe_min, StripeRounding::Up).max_piece(max_msg);
        let pieces = plan.pieces();
        let now = std::time::Instant::now();
        let mut split = None;
        let mut whole = Some(t.completion);
        if pieces > 1 {
            split = whole.take().map(|c| Arc::new(FanIn::new(pieces as usize, length, c)));
        }
        let write = t.opcode == Opcode::Write;
        for piece in plan {
            let rail = (first_rail + piece.stripe) % rails;
            let remote_rail = rail % remote_rails;
            let remote_abs = t.remote_addr + piece.offset;
            let remote = if core.rails[rail].virt_addr { remote_abs } else { remote_abs - buf.addr };
            let done = match (&split, whole.take()) {
                (Some(s), _) => PieceDone::Part(s.clone()),
                (None, Some(c)) => PieceDone::Whole(c),
                (None, None) => break,
            };
            let Some(local) = t.local.sub(piece.offset, piece.len) else {
                done.finish(Err(Error::InvalidArgument("piece outside its request".into())));
                continue;
            };
            per_rail[rail].push(Op {
                write,
                local,
                len: piece.len,
                remote,
                remote_abs,
                key: buf.keys[remote_rail],
                peer: peer.clone(),
                remote_rail,
                done,
                queued: now,
                retry_until: None,
                attempts: 0,
                suspect: false,
            });
        }
    }

    /// Stops the progress thread and returns the (blocking) rest of the shutdown: join, close.
    fn begin_shutdown(&self) -> Option<impl FnOnce() + Send + 'static> {
        sync::write(&self.peers).clear();
        let core = self.core.get()?.clone();
        core.stop();
        let handle = sync::lock(&self.thread).take();
        Some(move || {
            if let Some(h) = handle {
                if h.thread().id() != std::thread::current().id() {
                    let _ = h.join();
                }
            }
            core.close();
        })
    }
}

impl Drop for LibfabricTransport {
    fn drop(&mut self) {
        if let Some(finish) = self.begin_shutdown() {
            finish();
        }
    }
}

#[async_trait]
impl Transport for LibfabricTransport {
    fn name(&self) -> &str {
        self.protocol
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn start(&self, ctx: &TransportContext) -> Result<()> {
        if self.core.get().is_some() {
            return Err(Error::InvalidArgument(format!("{} transport started twice", self.protocol)));
        }
        let config = self.config.clone();
        let host = ctx.bind_host.clone();
        // fi_getinfo and opening endpoints can take milliseconds (tcp binds, shm creates regions).
        let rails = match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::spawn_blocking(move || core::open_rails(&config, &host))
                .await
                .map_err(|e| Error::unavailable(format!("opening libfabric rails: {e}")))??,
            Err(_) => core::open_rails(&config, &host)?,
        };
        let core = Arc::new(Core::new(self.protocol, self.config.clone(), rails, ctx.peer_events.clone()));
        let _ = self.regions.set(ctx.regions.clone());
        if self.core.set(core.clone()).is_err() {
            core.close();
            return Err(Error::InvalidArgument(format!("{} transport started twice", self.protocol)));
        }
        let runner = core.clone();
        let thread = std::thread::Builder::new()
            .name(format!("mc-{}-progress", self.protocol))
            .spawn(move || runner.run())
            .map_err(|e| {
                core.close();
                Error::unavailable(format!("cannot start the libfabric progress thread: {e}"))
            })?;
        *sync::lock(&self.thread) = Some(thread);
        if self.config.provider == "shm" {
            tracing::warn!(
                "libfabric's shm provider posts under a spinlock in the target's shared region: a peer killed \
                 while holding it stalls this process's libfabric transport for good (docs/testing.md); the \
                 `shm` protocol is the same-host transport that survives killed peers"
            );
        }
        tracing::debug!(
            protocol = self.protocol,
            provider = %self.config.provider,
            rails = ?self.rails(),
            addrs = ?self.addresses(),
            "libfabric transport started"
        );
        Ok(())
    }

    fn register_memory(&self, region: &RegionGuard, desc: &mut BufferDesc) -> Result<()> {
        if !region.is_host() {
            // Without FI_HMEM the provider would read GPU memory with the CPU: not published for libfabric, so
            // peers reach it through another transport (staged over tcp).
            return Ok(());
        }
        let core = self.started()?;
        let keys = core.register(region.addr, region.len)?;
        desc::write_keys(&core.fields, &keys, desc);
        // Peers reach the memory with the keys alone: keep the region registered until unregister_memory.
        sync::lock(&self.held).insert(region.addr, region.clone());
        Ok(())
    }

    fn unregister_memory(&self, region: &RegionGuard) -> Result<()> {
        if let Some(core) = self.core.get() {
            core.unregister(region.addr);
        }
        sync::lock(&self.held).remove(&region.addr);
        Ok(())
    }

    /// Only buffers published with memory keys (host memory).
    fn can_reach_buffer(&self, _target: &RemoteSegment, buffer: &BufferDesc) -> bool {
        self.core.get().is_none_or(|core| buffer.fields.contains_key(&core.fields.rkey))
    }

    fn describe(&self, desc: &mut SegmentDescriptor) {
        if let Some(core) = self.core.get() {
            core.publication.write(&core.fields, desc);
        }
    }

    fn can_reach(&self, target: &RemoteSegment) -> bool {
        let Some(core) = self.core.get() else { return false };
        // The engine asks for every request: answer from the cache for the descriptor it holds.
        if let Some(p) = sync::read(&self.peers).get(&target.name) {
            if std::ptr::eq(&*p.segment, target) {
                return true;
            }
        }
        self.parse_peer(core, target).is_ok()
    }

    fn submit(&self, target: &Arc<RemoteSegment>, tasks: Vec<TransferTask>) {
        let core = match self.started() {
            Ok(c) => c,
            Err(e) => return TransferTask::fail_all(tasks, &e),
        };
        let peer = match self.peer(core, target) {
            Ok(p) => p,
            Err(e) => return TransferTask::fail_all(tasks, &e),
        };
        // Reused per thread: no allocation per submission once warm.
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<Vec<Op>>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let mut per_rail = SCRATCH.with(|s| s.take());
        per_rail.resize_with(core.rails.len(), Vec::new);
        for t in tasks {
            if t.completion.is_final() {
                continue;
            }
            if t.length() == 0 {
                t.completion.finish(Err(Error::InvalidArgument("zero-length transfer".into())));
                continue;
            }
            if t.local_addr().checked_add(t.length()).is_none() {
                t.completion.finish(Err(Error::InvalidArgument("local address + length overflows".into())));
                continue;
            }
            self.plan_task(core, &peer, t, &mut per_rail);
        }
        for (rail, ops) in per_rail.iter_mut().enumerate() {
            if !ops.is_empty() {
                core.enqueue(rail, ops.drain(..));
            }
        }
        SCRATCH.with(|s| {
            let mut slot = s.borrow_mut();
            if slot.is_empty() {
                *slot = per_rail;
            }
        });
    }

    fn forget_peer(&self, segment_name: &str) {
        sync::write(&self.peers).remove(segment_name);
    }

    async fn shutdown(&self) {
        let Some(finish) = self.begin_shutdown() else { return };
        // Joining the progress thread and closing endpoints block briefly: not on a runtime worker.
        match tokio::runtime::Handle::try_current() {
            Ok(_) => {
                if let Err(e) = tokio::task::spawn_blocking(finish).await {
                    tracing::warn!(error = %e, "libfabric shutdown task failed");
                }
            }
            Err(_) => finish(),
        }
    }
}

/// Whether `provider` offers RDM endpoints with RMA here. Never panics.
pub fn probe_provider(provider: &str) -> Availability {
    let hints = fabric::Hints { provider: Some(provider.to_string()), ..Default::default() };
    match fabric::InfoList::query(&hints) {
        Ok(list) if !list.is_empty() => Availability::Available,
        Ok(_) => {
            let others = fabric::providers().map(|v| v.join(", ")).unwrap_or_default();
            Availability::Unavailable(format!(
                "no {provider} provider: libfabric offers no reliable-datagram endpoint with RMA for it here \
                 (available: {}){}",
                if others.is_empty() { "none" } else { others.as_str() },
                if provider == EFA_PROVIDER {
                    "; EFA needs an EFA-enabled instance with the efa kernel driver"
                } else {
                    "; choose another with MC_LIBFABRIC_PROVIDER"
                }
            ))
        }
        Err(e) => Availability::Unavailable(format!("libfabric fi_getinfo failed for {provider}: {e}")),
    }
}

fn probe_efa() -> Availability {
    probe_provider(EFA_PROVIDER)
}

fn probe_libfabric() -> Availability {
    probe_provider(&FabricConfig::from_backend(LIBFABRIC, &BackendConfig::default()).provider)
}

fn create_efa(config: &BackendConfig) -> Result<Arc<dyn Transport>> {
    Ok(Arc::new(LibfabricTransport::new(EFA, FabricConfig::from_backend(EFA, config))?))
}

fn create_libfabric(config: &BackendConfig) -> Result<Arc<dyn Transport>> {
    Ok(Arc::new(LibfabricTransport::new(LIBFABRIC, FabricConfig::from_backend(LIBFABRIC, config))?))
}

mooncake_core::inventory::submit! {
    TransportFactory {
        name: EFA,
        summary: "AWS EFA through libfabric: one-sided RMA, multi-NIC striping",
        probe: probe_efa,
        create: create_efa,
    }
}

mooncake_core::inventory::submit! {
    TransportFactory {
        name: LIBFABRIC,
        summary: "libfabric RDM + RMA (MC_LIBFABRIC_PROVIDER, default tcp;ofi_rxm): one-sided, multi-rail",
        probe: probe_libfabric,
        create: create_libfabric,
    }
}

/// Call from a final binary to make sure the linker keeps this crate's registrations.
pub fn link() {}

#[cfg(test)]
mod tests;
