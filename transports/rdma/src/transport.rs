//! The `Transport` implementation, generic over the [`Fabric`] so that the same code runs on
//! libibverbs (`verbs.rs`) and on the in-memory fabric of the tests.
//!
//! Data path: `submit` spawns one task on the engine's runtime per submission; it checks every
//! request (local range registered, remote range inside one published buffer), cuts it into
//! slices, picks a local and a remote NIC per slice from the two priority matrices, connects the
//! endpoint on first use (handshake over the peer's RPC socket), and posts one signaled RDMA
//! READ/WRITE per slice. One thread per NIC polls its completion queue (parking when nothing is
//! in flight), completes slices, and sends failed ones back to the runtime to be retried on
//! another rail. A request completes when all of its slices have.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use async_trait::async_trait;
use mooncake_core::{
    BufferDesc, Capabilities, Error, FanIn, MemoryDevice, MemoryKind, MemoryKinds, PeerEvents, PeerHandshake,
    PerfModel, RegionGuard, RegionTable, RemoteSegment, Result, SegmentDescriptor, TransferTask, Transport,
    TransportContext, stripe, sync,
};
use serde_json::Value;
use tokio::sync::Notify;

use crate::config::RdmaConfig;
use crate::discovery::UsableNic;
use crate::endpoint::Endpoint;
use crate::endpoint_cache::EndpointCache;
use crate::fabric::{Fabric, FabricProvider, WcStatus, WorkCompletion, WorkRequest, wc_status_text};
use crate::gid::Gid;
use crate::handshake::{HandshakeDesc, NicPath};
use crate::memory::{MemoryRegistry, MrBackend, MrSource, device_dmabuf};
use crate::qp::{LocalPort, RemotePort};
use crate::segment::{self, DeviceDesc, RemoteRdma};
use crate::slab::Slab;
use crate::slice::{MAX_RAILS, RetryExhausted, SliceAttempts, initial_rail, remote_rail};
use crate::topology::{PriorityMatrix, Rails, ResolvedMatrix, Topology};

/// Protocol name.
pub const NAME: &str = "rdma";

/// Completions taken from a CQ per poll.
const POLL_BATCH: usize = 64;
/// How long an idle poller parks before looking again (posters unpark it sooner).
const IDLE_PARK: Duration = Duration::from_millis(10);

fn shut_down() -> Error {
    Error::NotInitialized("rdma transport is shut down".into())
}

/// Capabilities of the RDMA transport.
pub fn capabilities(config: &RdmaConfig) -> Capabilities {
    Capabilities {
        read: true,
        write: true,
        notify: false,
        memory_kinds: MemoryKinds::of(&[MemoryKind::Host, MemoryKind::Cuda, MemoryKind::Rocm]),
        reports_peer_failure: true,
        requires_local_registration: true,
        cross_process: true,
        same_host_only: false,
        max_request_size: 1 << 40,
        min_request_size: 1,
        optimal_request_size: (config.slice_size * 64).max(4 << 20),
        alignment: 1,
        max_batch_size: 0,
        model: PerfModel {
            bandwidth_bytes_per_sec: 2.5e10,
            latency: Duration::from_micros(5),
            per_request_overhead: Duration::from_micros(1),
        },
    }
}

/// The RDMA transport over fabric provider `P` (libibverbs by default).
pub struct RdmaTransport<P: FabricProvider> {
    config: RdmaConfig,
    caps: Capabilities,
    provider: P,
    started: OnceLock<Arc<Started<P::Fabric>>>,
}

impl<P: FabricProvider> RdmaTransport<P> {
    /// A transport that finds and opens its NICs through `provider` on `start`. It reaches peers'
    /// handshake sockets through the engine's [`TransportContext::peers`] and asks the engine's
    /// memory devices ([`TransportContext::devices`]) for dmabuf exports of GPU memory.
    pub fn with_provider(config: RdmaConfig, provider: P) -> Self {
        RdmaTransport { caps: capabilities(&config), config, provider, started: OnceLock::new() }
    }

    /// Settings in use.
    pub fn config(&self) -> &RdmaConfig {
        &self.config
    }

    /// The NICs in use, in published order (empty before `start`).
    pub fn devices(&self) -> Vec<DeviceDesc> {
        self.started.get().map(|st| st.devices.clone()).unwrap_or_default()
    }

    /// The published priority matrix (`None` before `start`).
    pub fn priority_matrix(&self) -> Option<PriorityMatrix> {
        self.started.get().map(|st| st.matrix.clone())
    }

    /// Connected or connecting endpoints, over all NICs.
    pub fn endpoint_count(&self) -> usize {
        self.started.get().map_or(0, |st| st.endpoints.iter().map(|c| sync::lock(c).len()).sum())
    }

    /// Work requests posted and not yet completed, over all NICs.
    pub fn inflight(&self) -> usize {
        self.started.get().map_or(0, |st| st.inflight.iter().map(|s| sync::lock(s).len()).sum())
    }
}

/// Adapts a [`Fabric`] to the registry's [`MrBackend`].
struct FabricBackend<F>(Arc<F>);

impl<F: Fabric> MrBackend for FabricBackend<F> {
    type Mr = F::Mr;
    fn register(&self, device: usize, addr: u64, len: u64, source: MrSource) -> Result<F::Mr> {
        self.0.register(device, addr, len, source)
    }
    fn keys(mr: &F::Mr) -> (u32, u32) {
        F::keys(mr)
    }
}

/// One request being transferred.
struct TaskCtx {
    /// Completes the request once every slice has.
    tracker: FanIn,
    opcode: mooncake_core::Opcode,
    local_addr: u64,
    remote_addr: u64,
    length: u64,
    slice_size: u64,
    peer: Arc<RemoteRdma>,
    buffer: usize,
    local_rails: Arc<Rails>,
    remote_rails: Arc<Rails>,
    seed: usize,
    _guard: RegionGuard,
}

impl Drop for TaskCtx {
    /// Every slice reports before the last reference goes away; should one not, the request fails
    /// rather than hang.
    fn drop(&mut self) {
        self.tracker.abandon(Error::NotInitialized(
            "RDMA request dropped before all of its slices completed (transport shut down)".into(),
        ));
    }
}

/// One slice on its way. Dropping it unfinished fails its request (never a hang).
struct SliceJob {
    task: Arc<TaskCtx>,
    index: u64,
    local: usize,
    remote: usize,
    attempts: SliceAttempts,
    done: bool,
}

impl SliceJob {
    fn finish(mut self, result: Result<()>) {
        self.done = true;
        self.task.tracker.piece_done(result);
    }

    /// Offset and length of this slice (a slice is at most `MC_SLICE_SIZE`, 1 GiB, bytes).
    fn bounds(&self) -> (u64, u32) {
        let (offset, len) = stripe::piece_bounds(self.task.length, self.task.slice_size.max(1), self.index);
        (offset, len as u32)
    }
}

impl Drop for SliceJob {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            self.task.tracker.piece_done(Err(shut_down()));
        }
    }
}

struct InFlight<Q> {
    job: SliceJob,
    ep: Arc<Endpoint<Q>>,
    qp: usize,
    epoch: u64,
}

enum PostOutcome {
    Posted,
    /// Not retryable (local memory not registered, transport stopped).
    Fatal(SliceJob, Error),
    /// This rail failed; try another.
    Rail(SliceJob, Error),
}

type EpCache<Q> = Mutex<EndpointCache<String, Arc<Endpoint<Q>>>>;

/// Decoded peer descriptors, by segment name, with the segment they were decoded from.
type RemoteCache = Mutex<HashMap<String, (Weak<RemoteSegment>, Arc<RemoteRdma>)>>;

/// The transport once started: the opened NICs with their endpoints, in-flight slices and
/// completion-queue pollers, the memory registered with them, and what the engine handed over.
struct Started<F: Fabric> {
    config: RdmaConfig,
    fabric: Arc<F>,
    nics: Vec<UsableNic>,
    local_ports: Vec<LocalPort>,
    local_name: String,
    devices: Vec<DeviceDesc>,
    matrix: PriorityMatrix,
    resolved: ResolvedMatrix,
    memory: MemoryRegistry<FabricBackend<F>>,
    regions: Arc<RegionTable>,
    runtime: tokio::runtime::Handle,
    events: Arc<dyn PeerEvents>,
    peers: Arc<dyn PeerHandshake>,
    memory_devices: Vec<Arc<dyn MemoryDevice>>,
    endpoints: Vec<EpCache<F::Qp>>,
    remotes: RemoteCache,
    inflight: Vec<Mutex<Slab<InFlight<F::Qp>>>>,
    cq_outstanding: Vec<AtomicU32>,
    credits: Vec<Notify>,
    poller_threads: Vec<OnceLock<Thread>>,
    pollers: Mutex<Vec<JoinHandle<()>>>,
    stop: AtomicBool,
    seed: AtomicUsize,
}

impl<F: Fabric> Started<F> {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn local_path(&self, nic: usize) -> String {
        NicPath::new(&self.local_name, &self.nics[nic].name).to_string()
    }

    fn remote(&self, target: &Arc<RemoteSegment>) -> Result<Arc<RemoteRdma>> {
        let mut map = sync::lock(&self.remotes);
        if let Some((weak, r)) = map.get(&target.name) {
            if std::ptr::eq(weak.as_ptr(), Arc::as_ptr(target)) {
                return Ok(r.clone());
            }
        }
        let mut decoded = RemoteRdma::decode(&target.descriptor)?;
        if decoded.name.is_empty() {
            decoded.name = target.name.clone();
        }
        let r = Arc::new(decoded);
        map.insert(target.name.clone(), (Arc::downgrade(target), r.clone()));
        Ok(r)
    }

    /// The cached endpoint to `peer_path` on `nic`, or a new unconnected one.
    fn endpoint(&self, nic: usize, peer_path: &str) -> Result<Arc<Endpoint<F::Qp>>> {
        let mut cache = sync::lock(&self.endpoints[nic]);
        if let Some(ep) = cache.get(&peer_path.to_string()) {
            if !ep.is_broken() {
                return Ok(ep);
            }
        }
        let qps = (0..self.config.qp_per_ep).map(|_| self.fabric.create_qp(nic)).collect::<Result<Vec<_>>>()?;
        let ep = Arc::new(Endpoint::new(nic, peer_path.to_string(), qps));
        let dropped = cache.insert(peer_path.to_string(), ep.clone());
        drop(cache);
        drop(dropped);
        Ok(ep)
    }

    /// Drops `ep` from the cache when it is still the one cached (after a failure).
    fn evict(&self, ep: &Arc<Endpoint<F::Qp>>) {
        let mut cache = sync::lock(&self.endpoints[ep.nic]);
        if cache.get(&ep.peer).is_some_and(|cur| Arc::ptr_eq(&cur, ep)) {
            let gone = cache.remove(&ep.peer);
            drop(cache);
            drop(gone);
        }
    }

    fn local_port_of(&self, nic: usize) -> RemotePort {
        RemotePort { gid: self.nics[nic].gid.gid, lid: self.nics[nic].lid }
    }

    /// Connects `ep` as the initiator: loopback to itself, or a handshake with the peer.
    async fn connect_active(&self, ep: &Endpoint<F::Qp>, remote: RemotePort) -> Result<()> {
        let nic = ep.nic;
        let local_path = self.local_path(nic);
        if local_path == ep.peer {
            let me = self.local_port_of(nic);
            return ep.connect(ep.qp_nums(), &self.local_ports[nic], &me, &self.config);
        }
        let peer = NicPath::parse(&ep.peer)?;
        let request = HandshakeDesc {
            local_nic_path: local_path,
            peer_nic_path: ep.peer.clone(),
            qp_num: ep.qp_nums().to_vec(),
            local_lid: self.nics[nic].lid,
            local_gid: self.nics[nic].gid.gid.to_string(),
            ..Default::default()
        };
        let timeout = self.config.handshake_timeout;
        let reply = tokio::time::timeout(timeout, self.peers.connect(&peer.server, &request.to_json()))
            .await
            .map_err(|_| Error::Timeout(timeout))??;
        let reply = HandshakeDesc::from_json(&reply)?;
        reply.check_reply(&request)?;
        let remote = if reply.local_gid.is_empty() {
            remote
        } else {
            RemotePort { gid: Gid::parse(&reply.local_gid)?, lid: reply.local_lid }
        };
        ep.connect(&reply.qp_num, &self.local_ports[nic], &remote, &self.config)
    }

    /// A connected endpoint from `nic` to device `remote` of `peer`.
    async fn connected_endpoint(&self, nic: usize, peer: &RemoteRdma, remote: usize) -> Result<Arc<Endpoint<F::Qp>>> {
        let dev = peer
            .devices
            .get(remote)
            .ok_or_else(|| Error::Protocol(format!("segment {} has no device {remote}", peer.name)))?;
        let path = NicPath::new(&peer.name, &dev.name).to_string();
        let ep = self.endpoint(nic, &path)?;
        if ep.is_connected() {
            return Ok(ep);
        }
        {
            let _g = ep.handshake.lock().await;
            if !ep.is_connected() {
                self.connect_active(&ep, RemotePort { gid: peer.gids[remote], lid: dev.lid }).await?;
            }
        }
        Ok(ep)
    }

    /// Answers a peer's handshake (we are the passive side). Never takes the endpoint's handshake
    /// lock: two engines connecting to each other at once must not wait on each other.
    async fn accept(&self, request: &Value) -> HandshakeDesc {
        let req = match HandshakeDesc::from_json(request) {
            Ok(r) => r,
            Err(e) => return HandshakeDesc::rejection("", "", e.to_string()),
        };
        let reject = |msg: String| {
            tracing::warn!(peer = %req.local_nic_path, reason = %msg, "rejecting RDMA handshake");
            HandshakeDesc::rejection(&req.peer_nic_path, &req.local_nic_path, msg)
        };
        let (mine, theirs) = match (NicPath::parse(&req.peer_nic_path), NicPath::parse(&req.local_nic_path)) {
            (Ok(m), Ok(t)) => (m, t),
            (Err(e), _) | (_, Err(e)) => return reject(e.to_string()),
        };
        if mine.server != self.local_name {
            return reject(format!(
                "Invalid argument: this engine is {}, the handshake is for {}",
                self.local_name, mine.server
            ));
        }
        let Some(nic) = self.nics.iter().position(|n| n.name == mine.nic) else {
            return reject(format!("Peer nic not found in that server: {}", req.peer_nic_path));
        };
        let remote = if req.local_gid.is_empty() {
            match self.remote_port_from_descriptor(&theirs).await {
                Ok(r) => r,
                Err(e) => return reject(e.to_string()),
            }
        } else {
            match Gid::parse(&req.local_gid) {
                Ok(gid) => RemotePort { gid, lid: req.local_lid },
                Err(e) => return reject(e.to_string()),
            }
        };
        let ep = match self.endpoint(nic, &req.local_nic_path) {
            Ok(ep) => ep,
            Err(e) => return reject(e.to_string()),
        };
        if let Err(e) = ep.connect(&req.qp_num, &self.local_ports[nic], &remote, &self.config) {
            return reject(e.to_string());
        }
        HandshakeDesc {
            local_nic_path: req.peer_nic_path.clone(),
            peer_nic_path: req.local_nic_path.clone(),
            qp_num: ep.qp_nums().to_vec(),
            local_lid: self.nics[nic].lid,
            local_gid: self.nics[nic].gid.gid.to_string(),
            ..Default::default()
        }
    }

    /// GID and LID of a peer NIC from its descriptor (old peers send no `local_gid`).
    async fn remote_port_from_descriptor(&self, peer: &NicPath) -> Result<RemotePort> {
        let timeout = self.config.handshake_timeout;
        let desc = tokio::time::timeout(timeout, self.peers.descriptor(&peer.server))
            .await
            .map_err(|_| Error::Timeout(timeout))??;
        let r = RemoteRdma::decode(&desc)?;
        let i = r
            .device_index(&peer.nic)
            .ok_or_else(|| Error::NotFound(format!("segment {} publishes no NIC {}", peer.server, peer.nic)))?;
        Ok(RemotePort { gid: r.gids[i], lid: r.devices[i].lid })
    }

    /// Checks a request and cuts it into slices.
    fn prepare(&self, peer: &Arc<RemoteRdma>, t: TransferTask) -> Vec<SliceJob> {
        // The NIC reads and writes the local range: registered memory only (the task's own region, or a
        // lookup for a range the engine's caller vouched for), held until the request is finished.
        let guard = match t.local.registered_in(&self.regions, "local buffer of an RDMA transfer") {
            Ok(g) => g,
            Err(e) => {
                t.completion.finish(Err(e));
                return Vec::new();
            }
        };
        let length = t.length();
        let Some(buffer) = peer.buffer_index(t.remote_addr, length) else {
            t.completion.finish(Err(Error::AddressNotRegistered {
                addr: t.remote_addr,
                len: length,
                context: format!("remote segment {}", peer.name),
            }));
            return Vec::new();
        };
        let local_rails = self.resolved.rails_at(&guard.location).clone();
        let remote_rails = peer.buffers[buffer].rails.clone();
        if local_rails.is_empty() || remote_rails.is_empty() {
            t.completion.finish(Err(Error::unavailable("no RDMA device serves this memory location")));
            return Vec::new();
        }
        let slices = stripe::piece_count(length, self.config.slice_size.max(1));
        let seed = self.seed.fetch_add(1, Ordering::Relaxed);
        let task = Arc::new(TaskCtx {
            tracker: FanIn::new(slices as usize, length, t.completion),
            opcode: t.opcode,
            local_addr: t.local.addr(),
            remote_addr: t.remote_addr,
            length,
            slice_size: self.config.slice_size,
            peer: peer.clone(),
            buffer,
            local_rails,
            remote_rails,
            seed,
            _guard: guard,
        });
        (0..slices)
            .map(|i| SliceJob {
                local: initial_rail(&task.local_rails, seed, i as usize).unwrap_or(0),
                remote: remote_rail(&task.remote_rails, seed, i as usize, 0).unwrap_or(0),
                task: task.clone(),
                index: i,
                attempts: SliceAttempts::default(),
                done: false,
            })
            .collect()
    }

    /// Takes a CQ slot on `nic` (at most `max_cqe` outstanding); returns the previous count.
    fn reserve_cq(&self, nic: usize) -> Option<u32> {
        let max = self.config.max_cqe;
        self.cq_outstanding[nic].fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| (v < max).then_some(v + 1)).ok()
    }

    fn release_cq(&self, nic: usize) {
        let _ = self.cq_outstanding[nic].fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
    }

    /// Posts one slice on `ep`, waiting for queue room.
    async fn post_slice(&self, ep: &Arc<Endpoint<F::Qp>>, job: SliceJob) -> PostOutcome {
        let nic = ep.nic;
        let (offset, len) = job.bounds();
        let local_addr = job.task.local_addr + offset;
        let Some(lkey) = self.memory.lkey(local_addr, u64::from(len), nic) else {
            let e = Error::AddressNotRegistered {
                addr: local_addr,
                len: u64::from(len),
                context: "local memory is not registered with the RDMA NICs".into(),
            };
            return PostOutcome::Fatal(job, e);
        };
        let Some(&rkey) = job.task.peer.buffers[job.task.buffer].rkey.get(job.remote) else {
            return PostOutcome::Fatal(job, Error::Protocol("remote buffer has no key for the chosen NIC".into()));
        };
        let (qp, before) = loop {
            if self.stopped() {
                return PostOutcome::Fatal(job, shut_down());
            }
            if !ep.is_connected() {
                return PostOutcome::Rail(job, Error::disconnected(&ep.peer, "endpoint failed before posting"));
            }
            let notified = self.credits[nic].notified();
            if let Some(before) = self.reserve_cq(nic) {
                if let Some(qp) = ep.reserve(self.config.max_wr) {
                    break (qp, before);
                }
                self.release_cq(nic);
            }
            let _ = tokio::time::timeout(Duration::from_millis(5), notified).await;
        };
        let wr = WorkRequest {
            wr_id: 0,
            opcode: job.task.opcode,
            local_addr,
            lkey,
            length: len,
            remote_addr: job.task.remote_addr + offset,
            rkey,
        };
        let wr_id = sync::lock(&self.inflight[nic]).insert(InFlight { job, ep: ep.clone(), qp, epoch: ep.epoch() });
        let posted = ep.with_qp(qp, |q| self.fabric.post(q, &[WorkRequest { wr_id, ..wr }]));
        match posted {
            Some(Ok(())) => {
                if before == 0 {
                    if let Some(t) = self.poller_threads[nic].get() {
                        t.unpark();
                    }
                }
                PostOutcome::Posted
            }
            Some(Err(failure)) => self.take_back(nic, wr_id, failure.error),
            None => self.take_back(nic, wr_id, Error::Protocol("no such queue pair".into())),
        }
    }

    fn take_back(&self, nic: usize, wr_id: u64, error: Error) -> PostOutcome {
        match sync::lock(&self.inflight[nic]).remove(wr_id) {
            Some(inf) => {
                inf.ep.release(inf.qp);
                self.release_cq(nic);
                PostOutcome::Rail(inf.job, error)
            }
            None => PostOutcome::Posted,
        }
    }

    /// Moves a failed slice to its next rail, or fails it for good.
    fn next_rail(&self, mut job: SliceJob, error: Error) -> Option<SliceJob> {
        match job.attempts.next_after_failure(job.local, &job.task.local_rails, self.config.retry_cnt) {
            Ok(next) => {
                job.local = next;
                let seed = job.task.seed;
                job.remote = remote_rail(&job.task.remote_rails, seed, job.index as usize, job.attempts.attempts)
                    .unwrap_or(job.remote);
                tracing::debug!(rail = next, attempt = job.attempts.attempts, error = %error, "retrying RDMA slice");
                Some(job)
            }
            Err(exhausted) => {
                self.fail_slice(job, exhausted, error);
                None
            }
        }
    }

    fn fail_slice(&self, job: SliceJob, exhausted: RetryExhausted, last: Error) {
        let peer = job.task.peer.name.clone();
        let err = if last.is_disconnect() || matches!(last, Error::Timeout(_) | Error::Io(_)) {
            let (offset, len) = job.bounds();
            self.events.peer_failed(&peer);
            exhausted.into_error(&peer, offset, len, &last.to_string())
        } else {
            last
        };
        job.finish(Err(err));
    }

    /// Drives one slice until it is posted or failed for good.
    async fn dispatch(&self, mut job: SliceJob) {
        loop {
            if self.stopped() {
                job.finish(Err(shut_down()));
                return;
            }
            if job.task.tracker.is_final() {
                job.finish(Err(Error::Canceled));
                return;
            }
            let peer = job.task.peer.clone();
            let error = match self.connected_endpoint(job.local, &peer, job.remote).await {
                Err(e) => e,
                Ok(ep) => {
                    let epoch = ep.epoch();
                    match self.post_slice(&ep, job).await {
                        PostOutcome::Posted => return,
                        PostOutcome::Fatal(j, e) => {
                            j.finish(Err(e));
                            return;
                        }
                        PostOutcome::Rail(j, e) => {
                            job = j;
                            if ep.mark_broken_since(epoch) {
                                self.evict(&ep);
                            }
                            e
                        }
                    }
                }
            };
            match self.next_rail(job, error) {
                Some(j) => job = j,
                None => return,
            }
        }
    }

    async fn run(self: Arc<Self>, target: Arc<RemoteSegment>, tasks: Vec<TransferTask>) {
        let peer = match self.remote(&target) {
            Ok(p) => p,
            Err(e) => {
                TransferTask::fail_all(tasks, &e);
                return;
            }
        };
        for t in tasks {
            if t.completion.is_final() {
                continue;
            }
            for job in self.prepare(&peer, t) {
                self.dispatch(job).await;
            }
        }
    }

    fn on_completion(self: &Arc<Self>, nic: usize, wc: WorkCompletion) {
        let Some(inf) = sync::lock(&self.inflight[nic]).remove(wc.wr_id) else {
            tracing::debug!(wr_id = wc.wr_id, "completion for an unknown work request");
            return;
        };
        self.release_cq(nic);
        inf.ep.release(inf.qp);
        match wc.status {
            WcStatus::Success => inf.job.finish(Ok(())),
            WcStatus::Error { code, vendor_err } => {
                if inf.ep.mark_broken_since(inf.epoch) {
                    self.evict(&inf.ep);
                }
                let error = Error::disconnected(
                    &inf.ep.peer,
                    format!(
                        "{} (status {code}, vendor error {vendor_err:#x}) on {}",
                        wc_status_text(code),
                        self.nics[nic].name
                    ),
                );
                if let Some(job) = self.next_rail(inf.job, error) {
                    let this = self.clone();
                    self.runtime.spawn(async move { this.dispatch(job).await });
                }
            }
        }
    }

    /// Takes every slice still in flight off its endpoint (shutdown); the caller fails them once
    /// the queue pairs are gone.
    fn take_inflight(&self) -> Vec<SliceJob> {
        let mut jobs = Vec::new();
        for (nic, slab) in self.inflight.iter().enumerate() {
            let drained = sync::lock(slab).drain();
            for inf in drained {
                inf.ep.release(inf.qp);
                self.release_cq(nic);
                jobs.push(inf.job);
            }
        }
        jobs
    }
}

fn poll_loop<F: Fabric>(started: Weak<Started<F>>, nic: usize) {
    let mut wcs = vec![WorkCompletion { wr_id: 0, status: WcStatus::Success }; POLL_BATCH];
    let mut idle: u32 = 0;
    let mut errors: u32 = 0;
    loop {
        let Some(st) = started.upgrade() else { return };
        if st.stopped() {
            return;
        }
        match st.fabric.poll(nic, &mut wcs) {
            Ok(0) => {
                let nothing_in_flight = st.cq_outstanding[nic].load(Ordering::Acquire) == 0;
                drop(st);
                idle = idle.saturating_add(1);
                if nothing_in_flight && idle > 64 {
                    std::thread::park_timeout(IDLE_PARK);
                } else if idle < 256 {
                    std::hint::spin_loop();
                } else if idle < 1024 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
            Ok(n) => {
                idle = 0;
                for wc in &wcs[..n.min(wcs.len())] {
                    st.on_completion(nic, *wc);
                }
                st.credits[nic].notify_waiters();
            }
            Err(err) => {
                errors = errors.saturating_add(1);
                if errors.is_power_of_two() {
                    tracing::error!(nic = %st.nics[nic].name, error = %err, count = errors, "polling the completion queue failed");
                }
                drop(st);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Pins the calling thread to `cpus` (best effort; NUMA-local polling).
fn pin_current_thread(cpus: &[u32]) {
    if cpus.is_empty() {
        return;
    }
    // SAFETY: cpu_set_t is a plain bit array for which all-zero is the empty set; CPU_SET only
    // writes inside it for indices below CPU_SETSIZE (checked); sched_setaffinity(0, ...) reads
    // `size_of::<cpu_set_t>()` bytes of the set we own and affects only this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            if (c as usize) < libc::CPU_SETSIZE as usize {
                libc::CPU_SET(c as usize, &mut set);
            }
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "cannot pin the CQ poller");
        }
    }
}

#[async_trait]
impl<P: FabricProvider> Transport for RdmaTransport<P> {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn start(&self, ctx: &TransportContext) -> Result<()> {
        if self.started.get().is_some() {
            return Err(Error::InvalidArgument("rdma transport started twice".into()));
        }
        let config = self.config.clone();
        let found = self.provider.discover(&config)?;
        let names: Vec<String> = found.iter().map(|n| n.name.clone()).collect();
        let topology =
            Topology::discover(&config.sysfs_root, &config.device_filter).with_driver_ordinals(&gpu_ordinals(ctx));
        let matrix = topology.priority_matrix(&names);
        let mut order = matrix.device_order();
        order.extend(names.iter().filter(|n| !order.contains(n)).cloned().collect::<Vec<_>>());
        order.truncate(MAX_RAILS);
        let matrix = restrict(&matrix, &order);
        let nics: Vec<UsableNic> =
            order.iter().filter_map(|name| found.iter().find(|n| &n.name == name).cloned()).collect();
        let fabric = Arc::new(self.provider.open(&config, &nics)?);
        let devices: Vec<DeviceDesc> =
            nics.iter().map(|n| DeviceDesc { name: n.name.clone(), lid: n.lid, gid: n.gid.gid.to_string() }).collect();
        let local_ports = nics
            .iter()
            .map(|n| LocalPort { port: n.port, sgid_index: n.gid.index as u8, active_mtu: n.active_mtu })
            .collect();
        let n = nics.len();
        let started = Arc::new(Started {
            resolved: matrix.resolve(&order),
            matrix,
            memory: MemoryRegistry::new(FabricBackend(fabric.clone()), n),
            fabric,
            local_ports,
            local_name: ctx.local_name.clone(),
            devices,
            regions: ctx.regions.clone(),
            runtime: ctx.runtime.clone(),
            events: ctx.peer_events.clone(),
            peers: ctx.peers.clone(),
            memory_devices: ctx.devices.clone(),
            endpoints: (0..n).map(|_| Mutex::new(EndpointCache::new(config.max_ep_per_ctx))).collect(),
            remotes: Mutex::new(HashMap::new()),
            inflight: (0..n).map(|_| Mutex::new(Slab::default())).collect(),
            cq_outstanding: (0..n).map(|_| AtomicU32::new(0)).collect(),
            credits: (0..n).map(|_| Notify::new()).collect(),
            poller_threads: (0..n).map(|_| OnceLock::new()).collect(),
            pollers: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            seed: AtomicUsize::new(0),
            nics,
            config,
        });
        for i in 0..n {
            let weak = Arc::downgrade(&started);
            let cpus = topology.cpus_near(&started.nics[i].name);
            let handle =
                std::thread::Builder::new().name(format!("mc-rdma-cq-{}", started.nics[i].name)).spawn(move || {
                    pin_current_thread(&cpus);
                    poll_loop(weak, i)
                })?;
            let _ = started.poller_threads[i].set(handle.thread().clone());
            sync::lock(&started.pollers).push(handle);
        }
        tracing::info!(
            nics = ?started.devices.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            matrix = %started.matrix.to_json(),
            "rdma transport started"
        );
        if let Err(again) = self.started.set(started) {
            again.stop.store(true, Ordering::Release);
            return Err(Error::InvalidArgument("rdma transport started twice".into()));
        }
        Ok(())
    }

    fn register_memory(&self, region: &RegionGuard, desc: &mut BufferDesc) -> Result<()> {
        let st = self.started.get().ok_or_else(|| Error::NotInitialized("rdma transport not started".into()))?;
        let dmabuf = match region.location.kind() {
            Some(k) if k != MemoryKind::Host => device_dmabuf(&st.memory_devices, region),
            _ => None,
        };
        let keys = st.memory.register(region, dmabuf)?;
        desc.set_section(&segment::RdmaBufferKeys { rkey: keys.rkey, lkey: keys.lkey });
        Ok(())
    }

    fn unregister_memory(&self, region: &RegionGuard) -> Result<()> {
        match self.started.get() {
            Some(st) => st.memory.unregister(region.addr),
            None => Ok(()),
        }
    }

    fn describe(&self, desc: &mut SegmentDescriptor) {
        if let Some(st) = self.started.get() {
            segment::describe(desc, &st.devices, &st.matrix);
        }
    }

    fn can_reach(&self, target: &RemoteSegment) -> bool {
        self.started.get().is_some() && segment::publishes_devices(&target.descriptor)
    }

    fn submit(&self, target: &Arc<RemoteSegment>, tasks: Vec<TransferTask>) {
        let started = match self.started.get() {
            Some(st) if !st.stopped() => st.clone(),
            Some(_) => {
                TransferTask::fail_all(tasks, &shut_down());
                return;
            }
            None => {
                TransferTask::fail_all(tasks, &Error::NotInitialized("rdma transport not started".into()));
                return;
            }
        };
        let runtime = started.runtime.clone();
        runtime.spawn(started.run(target.clone(), tasks));
    }

    fn forget_peer(&self, segment_name: &str) {
        let Some(st) = self.started.get() else { return };
        sync::lock(&st.remotes).remove(segment_name);
        for cache in &st.endpoints {
            let gone = sync::lock(cache).remove_where(|k| NicPath::parse(k).is_ok_and(|p| p.server == segment_name));
            drop(gone);
        }
    }

    async fn handle_handshake(&self, request: &Value) -> Option<Result<Value>> {
        if !HandshakeDesc::is_rdma_request(request) {
            return None;
        }
        match self.started.get() {
            Some(st) if !st.stopped() => Some(Ok(st.accept(request).await.to_json())),
            _ => Some(Err(Error::NotInitialized("rdma transport not started".into()))),
        }
    }

    async fn shutdown(&self) {
        let Some(st) = self.started.get() else { return };
        st.stop.store(true, Ordering::Release);
        let handles: Vec<JoinHandle<()>> = sync::lock(&st.pollers).drain(..).collect();
        for h in handles {
            h.thread().unpark();
            let _ = h.join();
        }
        let jobs = st.take_inflight();
        for cache in &st.endpoints {
            let gone = sync::lock(cache).drain();
            drop(gone);
        }
        // The queue pairs are destroyed (nothing can touch the buffers any more): fail the slices.
        for job in jobs {
            job.finish(Err(shut_down()));
        }
        sync::lock(&st.remotes).clear();
        st.memory.clear();
        for n in &st.credits {
            n.notify_waiters();
        }
    }
}

/// The matrix with only the NICs in `keep` (those that were opened).
fn restrict(matrix: &PriorityMatrix, keep: &[String]) -> PriorityMatrix {
    let mut out = matrix.clone();
    for e in out.entries.values_mut() {
        e.preferred.retain(|n| keep.contains(n));
        e.fallback.retain(|n| keep.contains(n));
    }
    out
}

#[cfg(test)]
mod tests;

/// `(location, PCI address)` of every GPU the engine's devices know (`cuda:0` -> `0000:3b:00.0`), for the NIC
/// priority matrix. Asks ordinals until a device reports none.
fn gpu_ordinals(ctx: &TransportContext) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for d in ctx.devices.iter().filter(|d| d.kind() != mooncake_core::MemoryKind::Host) {
        for n in 0..d.capabilities().device_count {
            let loc = mooncake_core::Location::Device(d.kind(), n);
            if let Some(pci) = d.pci_address(&loc) {
                out.push((loc.to_string(), pci));
            }
        }
    }
    out
}
