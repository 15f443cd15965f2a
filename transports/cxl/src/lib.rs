//! CXL transport of mooncake-rs (protocol `"cxl"`), compatible with upstream Mooncake's `CxlTransport`.
//!
//! Every engine maps the same CXL region (the `cxl` memory device, `MC_CXL_DEV_PATH`; see
//! `mooncake-device-cxl`). A segment publishes upstream's descriptor: top-level `cxl_name` (the device path) and
//! `cxl_base_addr` (where its owner mapped the region), buffers `{name, offset, length}`; for a segment whose
//! protocol is `cxl` a request's remote address is that OFFSET into the region. The INITIATOR copies between its
//! local buffer and its own mapping of the region with `memcpy`; the owner does nothing. Only buffers inside the
//! region are published (a cxl-primary engine publishes nothing else).
//!
//! # What is checked
//! Upstream trusts the offset. Here every copy checks, in the initiator, that the range lies inside a buffer the
//! target's descriptor lists, inside the allocatable part of the region (the header is never written through
//! the transport), and, for targets of ours, that the buffer is still published in the region's publication
//! table by a live engine: a buffer the target unregistered since (a stale descriptor) is refused with
//! `AddressNotRegistered`, a target engine that shut down or whose process exited (same host) with
//! `RemoteDisconnected`, and unregistering waits for copies in flight (see `mooncake_device_cxl::region`). Upstream
//! targets publish no table entries; their ranges are checked against their descriptor and the region only.
//!
//! # Memory ordering
//! A copy is plain loads and stores to shared memory. What makes the bytes visible to a peer is the ordering
//! between them and the event that tells the peer about them (the transfer's completion, then a store master's
//! update or a notification over the handshake socket):
//! - after writing a range the transport issues a release fence before the completion is signalled, so a peer that
//!   observes the completion (through any channel that itself synchronizes, with acquire ordering) observes the
//!   bytes; system calls and sockets on the way are full barriers in practice, the fence states the requirement;
//! - before reading a range it issues an acquire fence, so the loads are not ordered before the event that told
//!   this process the bytes were ready.
//!
//! On one host, and on CXL 3.x shared memory that keeps caches coherent across hosts (back-invalidation), that is
//! all. CXL 2.0 memory pooling shared by software is not coherent across hosts: a store can stay in the writer's
//! cache and a reader can hit a stale line. `MC_CXL_FLUSH=1` (also honoured by the device's own copies) writes
//! back every written line (`clwb`, else `clflushopt`, else `clflush`) followed by `sfence` before the completion,
//! and invalidates every line of a range (`clflushopt`/`clflush`, then `mfence`) before reading it; these are x86-64
//! instructions (`mooncake_device_cxl::flush`), other architectures get the fences only. The publication table's
//! atomics assume coherence; without it, use the transport between processes of one host or accept upstream's
//! unchecked semantics.
//!
//! # Threads
//! Requests of at most `inline_max` bytes are copied inside `submit` (up to that many bytes per call), the rest by
//! copy threads; a request of at least twice `stripe_min` is striped over them. The blocking paths
//! (`transfer_blocking*`) copy on the calling thread, striping a large request over the caller and the copy
//! threads. Settings (engine options or environment): `workers` / `MC_CXL_WORKERS` (default min(2, cores)),
//! `stripe_min` / `MC_CXL_STRIPE_MIN` (default 4 MiB), `inline_max` / `MC_CXL_INLINE_MAX` (default 64 KiB),
//! `unregister_wait_ms` / `MC_CXL_UNREGISTER_WAIT_MS` (default 30000); `MC_CXL_FLUSH` as above.
//!
//! ```no_run
//! // MC_CXL_DEV_PATH=/dev/dax0.0 (or a file) in the environment of every process.
//! mooncake_transport_cxl::link();
//! mooncake_device_cxl::link();
//! let config = mooncake_core::EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols(["cxl"]);
//! let engine = mooncake_core::TransferEngine::new(config).unwrap();
//! let dev = engine.devices().iter().find(|d| d.name() == "cxl").unwrap().clone();
//! let buf = dev.allocate(1 << 20, &Default::default()).unwrap();
//! engine.register_allocation(&dev, &buf, "*").unwrap(); // published as {name: "cxl:0", offset, length}
//! ```

mod copy;
pub mod section;
mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use mooncake_core::registry::{Availability, TransportFactory};
use mooncake_core::{
    Access, BackendConfig, Batch, BlockingRequest, BufferDesc, Capabilities, Error, FanIn, LocalRange, MemoryDevice,
    MemoryKind, MemoryKinds, Opcode, PerfModel, PieceDone, RegionGuard, RemoteSegment, Result, SegmentDescriptor,
    StripePlan, StripeRounding, TransferTask, Transport, TransportContext, sync,
};
use mooncake_device_cxl::{CxlDevice, OwnerKind, OwnerRef, Publication};

use copy::{Ctx, PeerEntry, Piece};
use section::{CxlBuffer, CxlSegment};
use worker::Pool;

/// Protocol name.
pub const NAME: &str = "cxl";

/// How long shutdown waits for peers' copies into our buffers.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Bytes of small requests one `submit` call copies itself before handing the rest to the copy threads.
const INLINE_BUDGET: u64 = 256 << 10;

/// Tunables of the cxl transport.
#[derive(Debug, Clone, PartialEq)]
pub struct CxlTransportConfig {
    /// Copy threads.
    pub workers: usize,
    /// Requests of at least twice this size are striped over the copy threads (and the caller, when blocking).
    pub stripe_min: u64,
    /// Requests up to this size are copied inside `submit`.
    pub inline_max: u64,
    /// How long unregistering waits for peers still copying.
    pub unregister_wait: Duration,
}

impl Default for CxlTransportConfig {
    fn default() -> Self {
        CxlTransportConfig::from_backend(&BackendConfig::default())
    }
}

impl CxlTransportConfig {
    /// Reads options and `MC_CXL_*` environment variables.
    pub fn from_backend(config: &BackendConfig) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        CxlTransportConfig {
            workers: config.get::<usize>("workers", "MC_CXL_WORKERS").unwrap_or(cores.min(2)).clamp(1, 64),
            stripe_min: config.get::<u64>("stripe_min", "MC_CXL_STRIPE_MIN").unwrap_or(4 << 20).max(64 << 10),
            inline_max: config.get::<u64>("inline_max", "MC_CXL_INLINE_MAX").unwrap_or(64 << 10),
            unregister_wait: Duration::from_millis(
                config.get::<u64>("unregister_wait_ms", "MC_CXL_UNREGISTER_WAIT_MS").unwrap_or(30_000),
            ),
        }
    }

    fn plan(&self, len: u64, lanes: usize) -> StripePlan {
        StripePlan::new(len, lanes, self.stripe_min, StripeRounding::Down)
    }
}

/// The capabilities every cxl instance declares.
fn capabilities() -> Capabilities {
    Capabilities {
        read: true,
        write: true,
        notify: false,
        // Local memory: host or region memory (the CPU copies it). The remote side is always region memory.
        memory_kinds: MemoryKinds::of(&[MemoryKind::Host, MemoryKind::Cxl]),
        reports_peer_failure: true,
        requires_local_registration: false,
        cross_process: true,
        same_host_only: false,
        max_request_size: 1 << 40,
        min_request_size: 1,
        optimal_request_size: 1 << 20,
        alignment: 1,
        max_batch_size: 0,
        model: PerfModel {
            bandwidth_bytes_per_sec: 20.0e9,
            latency: Duration::from_nanos(500),
            per_request_overhead: Duration::from_nanos(200),
        },
    }
}

struct Started {
    device: Arc<CxlDevice>,
    owner: OwnerRef,
    ctx: Arc<Ctx>,
    pool: Pool,
    /// Buffers published in the region's table, kept registered until withdrawn.
    published: Mutex<HashMap<u64, (RegionGuard, Publication)>>,
    /// Set once shut down.
    closed: std::sync::atomic::AtomicBool,
}

/// The cxl transport.
pub struct CxlTransport {
    config: CxlTransportConfig,
    caps: Capabilities,
    started: OnceLock<Started>,
    peers: RwLock<HashMap<String, Arc<PeerEntry>>>,
}

impl std::fmt::Debug for CxlTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CxlTransport")
            .field("config", &self.config)
            .field("started", &self.started.get().is_some())
            .finish_non_exhaustive()
    }
}

impl CxlTransport {
    /// A transport with the given settings (not started).
    pub fn new(config: CxlTransportConfig) -> Self {
        CxlTransport { config, caps: capabilities(), started: OnceLock::new(), peers: RwLock::new(HashMap::new()) }
    }

    /// The settings in use.
    pub fn config(&self) -> &CxlTransportConfig {
        &self.config
    }

    /// The device (region mapping) this transport copies through, once started.
    pub fn device(&self) -> Option<&Arc<CxlDevice>> {
        self.started.get().map(|s| &s.device)
    }

    fn started(&self) -> Result<&Started> {
        let st = self.started.get().ok_or_else(|| Error::NotInitialized("cxl transport not started".into()))?;
        if st.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::NotInitialized("the cxl transport was shut down".into()));
        }
        Ok(st)
    }

    /// The entry for `target`, rebuilt when its descriptor changed.
    fn peer_for(&self, st: &Started, target: &Arc<RemoteSegment>) -> Result<Arc<PeerEntry>> {
        if let Some(e) = sync::read(&self.peers).get(&target.name) {
            if Arc::ptr_eq(&e.seg, target) {
                return Ok(e.clone());
            }
        }
        let entry = Arc::new(PeerEntry::new(&st.ctx.region, target.clone()).inspect_err(|e| {
            if e.is_disconnect() {
                st.ctx.events.peer_failed(&target.name);
            }
        })?);
        sync::write(&self.peers).insert(target.name.clone(), entry.clone());
        Ok(entry)
    }

    /// Copies one request on the calling thread, striping a large one over this thread and the copy threads.
    fn copy_blocking(
        &self,
        st: &Started,
        peer: &Arc<PeerEntry>,
        op: Opcode,
        local: &LocalRange,
        remote: u64,
        timeout: Duration,
    ) -> Result<u64> {
        let len = local.len();
        let buf = peer.find(remote, len).ok_or_else(|| copy::not_published(&peer.seg.name, remote, len))?;
        let plan = self.config.plan(len, self.config.workers + 1);
        if !plan.is_striped() {
            return copy::copy(&st.ctx, peer, buf, op, local, remote);
        }
        let batch = Batch::new(1);
        batch.reserve(1)?;
        let fan = Arc::new(FanIn::new(plan.stripes() as usize, len, batch.completion(0)));
        let mut mine = None;
        let mut pieces = Vec::new();
        for p in plan {
            let Some(part) = local.sub(p.offset, p.len) else {
                PieceDone::Part(fan.clone()).finish(Err(Error::InvalidArgument("stripe outside its request".into())));
                continue;
            };
            if mine.is_none() {
                mine = Some((part, remote + p.offset));
                continue;
            }
            let done = PieceDone::Part(fan.clone());
            pieces.push(Piece { op, local: part, remote: remote + p.offset, peer: peer.clone(), buf, done });
        }
        st.pool.push(pieces);
        if let Some((part, at)) = mine {
            let r = copy::copy(&st.ctx, peer, buf, op, &part, at);
            fan.piece_done(r.map(drop));
        }
        batch.wait_blocking(timeout)?;
        batch.result(0)
    }
}

#[async_trait]
impl Transport for CxlTransport {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn start(&self, ctx: &TransportContext) -> Result<()> {
        // The process-wide mapping, the same the engine's `cxl` memory device allocates from.
        let device = CxlDevice::shared()?;
        let region = device.region().clone();
        let owner = region.register_owner(OwnerKind::Engine)?;
        let c = Arc::new(Ctx { region: region.clone(), flush: region.flushes(), events: ctx.peer_events.clone() });
        let pool = match Pool::spawn(self.config.workers, c.clone()) {
            Ok(p) => p,
            Err(e) => {
                region.retire_owner(owner);
                return Err(e.into());
            }
        };
        let started = Started {
            device,
            owner,
            ctx: c,
            pool,
            published: Mutex::new(HashMap::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
        };
        if let Err(again) = self.started.set(started) {
            again.pool.stop();
            again.ctx.region.retire_owner(again.owner);
            return Err(Error::InvalidArgument("cxl transport started twice".into()));
        }
        tracing::debug!(path = %region.path().display(), base = region.base(), owner = owner.index, "cxl transport started");
        Ok(())
    }

    /// Publishes buffers that lie in the region (at their offset); others are left alone, so a cxl-primary
    /// engine does not publish them.
    fn register_memory(&self, region: &RegionGuard, desc: &mut BufferDesc) -> Result<()> {
        let st = self.started()?;
        if !region.is_host() {
            return Ok(());
        }
        let r = &st.ctx.region;
        let Some(offset) = r.offset_of(region.addr, region.len) else {
            return Ok(());
        };
        if st.device.allocation_of(region.addr, region.len).is_none() {
            tracing::warn!(
                addr = region.addr,
                len = region.len,
                "cxl: a registered range in the region is no allocation of this process's device; not published"
            );
            return Ok(());
        }
        let p = r.publish(st.owner, offset, region.len)?;
        desc.set_section(&CxlBuffer { offset, publication: Some(p) });
        sync::lock(&st.published).insert(region.addr, (region.clone(), p));
        Ok(())
    }

    fn unregister_memory(&self, region: &RegionGuard) -> Result<()> {
        let Some(st) = self.started.get() else { return Ok(()) };
        let Some((guard, p)) = sync::lock(&st.published).get(&region.addr).cloned() else { return Ok(()) };
        st.ctx.region.withdraw(p, self.config.unregister_wait)?;
        sync::lock(&st.published).remove(&region.addr);
        drop(guard);
        Ok(())
    }

    fn describe(&self, desc: &mut SegmentDescriptor) {
        if let Some(st) = self.started.get() {
            let r = &st.ctx.region;
            desc.set_section(&CxlSegment {
                name: r.path().display().to_string(),
                base_addr: r.base(),
                region_id: Some(r.id()),
                owner: Some(st.owner),
            });
        }
    }

    /// Targets that publish the region this engine maps (same region id; for upstream targets, same device path).
    fn can_reach(&self, target: &RemoteSegment) -> bool {
        // Asked for every request: an entry built from this very segment answers without parsing it again.
        if sync::read(&self.peers).get(&target.name).is_some_and(|e| std::ptr::eq(Arc::as_ptr(&e.seg), target)) {
            return true;
        }
        self.started.get().is_some_and(|st| copy::same_region(&st.ctx.region, &target.descriptor).is_ok())
    }

    /// Buffers published with their region offset.
    fn can_reach_buffer(&self, _target: &RemoteSegment, buffer: &BufferDesc) -> bool {
        copy::cxl_buffer(buffer).is_some()
    }

    async fn connect(&self, target: &RemoteSegment) -> Result<()> {
        let st = self.started()?;
        self.peer_for(st, &Arc::new(target.clone())).map(drop)
    }

    fn submit(&self, target: &Arc<RemoteSegment>, tasks: Vec<TransferTask>) {
        let st = match self.started() {
            Ok(st) => st,
            Err(e) => return TransferTask::fail_all(tasks, &e),
        };
        let peer = match self.peer_for(st, target) {
            Ok(p) => p,
            Err(e) => return TransferTask::fail_all(tasks, &e),
        };
        let mut budget = INLINE_BUDGET;
        let mut pieces = Vec::new();
        for t in tasks {
            let len = t.length();
            let Some(buf) = peer.find(t.remote_addr, len) else {
                t.completion.finish(Err(copy::not_published(&target.name, t.remote_addr, len)));
                continue;
            };
            if len <= self.config.inline_max && len <= budget {
                budget -= len;
                let r = copy::copy(&st.ctx, &peer, buf, t.opcode, &t.local, t.remote_addr);
                t.completion.finish(r);
                continue;
            }
            let plan = self.config.plan(len, self.config.workers);
            if !plan.is_striped() {
                let done = PieceDone::Whole(t.completion);
                pieces.push(Piece {
                    op: t.opcode,
                    local: t.local,
                    remote: t.remote_addr,
                    peer: peer.clone(),
                    buf,
                    done,
                });
                continue;
            }
            let fan = Arc::new(FanIn::new(plan.stripes() as usize, len, t.completion));
            for p in plan {
                let done = PieceDone::Part(fan.clone());
                let Some(local) = t.local.sub(p.offset, p.len) else {
                    done.finish(Err(Error::InvalidArgument("stripe outside its request".into())));
                    continue;
                };
                pieces.push(Piece {
                    op: t.opcode,
                    local,
                    remote: t.remote_addr + p.offset,
                    peer: peer.clone(),
                    buf,
                    done,
                });
            }
        }
        st.pool.push(pieces);
    }

    fn transfer_blocking(
        &self,
        target: &Arc<RemoteSegment>,
        opcode: Opcode,
        local: &LocalRange,
        remote_addr: u64,
        timeout: Duration,
    ) -> Option<Result<u64>> {
        if !matches!(local.access(), Access::Host) {
            return None;
        }
        let st = match self.started() {
            Ok(st) => st,
            Err(e) => return Some(Err(e)),
        };
        Some(
            self.peer_for(st, target)
                .and_then(|peer| self.copy_blocking(st, &peer, opcode, local, remote_addr, timeout)),
        )
    }

    fn transfer_blocking_batch(
        &self,
        target: &Arc<RemoteSegment>,
        opcode: Opcode,
        requests: &[BlockingRequest],
        timeout: Duration,
    ) -> Option<Vec<Result<u64>>> {
        if requests.iter().any(|r| !matches!(r.local.access(), Access::Host)) {
            return None;
        }
        let st = match self.started() {
            Ok(st) => st,
            Err(e) => return Some(requests.iter().map(|_| Err(e.clone())).collect()),
        };
        let peer = match self.peer_for(st, target) {
            Ok(p) => p,
            Err(e) => return Some(requests.iter().map(|_| Err(e.clone())).collect()),
        };
        Some(requests.iter().map(|r| self.copy_blocking(st, &peer, opcode, &r.local, r.remote_addr, timeout)).collect())
    }

    fn forget_peer(&self, segment_name: &str) {
        sync::write(&self.peers).remove(segment_name);
    }

    async fn shutdown(&self) {
        self.close();
    }
}

impl CxlTransport {
    /// Retires this engine's owner entry (peers' copies into our buffers are refused from now on), withdraws every
    /// publication (waiting a little for copies in flight) and stops the copy threads. Idempotent.
    fn close(&self) {
        let Some(st) = self.started.get() else { return };
        if st.closed.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        st.ctx.region.retire_owner(st.owner);
        let published: Vec<(RegionGuard, Publication)> = sync::lock(&st.published).drain().map(|(_, v)| v).collect();
        for (guard, p) in published {
            if let Err(e) = st.ctx.region.withdraw(p, CLOSE_WAIT) {
                tracing::warn!(addr = guard.addr, error = %e, "cxl: a peer was still copying when the transport shut down");
                // Keep the memory registered: an initiator may still be inside it.
                std::mem::forget(guard);
            }
        }
        st.pool.stop();
        sync::write(&self.peers).clear();
    }
}

impl Drop for CxlTransport {
    fn drop(&mut self) {
        self.close();
    }
}

fn probe() -> Availability {
    match CxlDevice::shared() {
        Ok(_) => Availability::Available,
        Err(e) => Availability::Unavailable(e.to_string()),
    }
}

fn create(config: &BackendConfig) -> Result<Arc<dyn Transport>> {
    Ok(Arc::new(CxlTransport::new(CxlTransportConfig::from_backend(config))))
}

mooncake_core::inventory::submit! {
    TransportFactory {
        name: NAME,
        summary: "CXL shared memory: the initiator copies into its own mapping of the region (MC_CXL_DEV_PATH)",
        probe,
        create,
    }
}

/// Call from a final binary to make sure the linker keeps this crate's registration (and the cxl device's).
pub fn link() {
    mooncake_device_cxl::link();
}
