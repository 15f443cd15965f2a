//! `TransferEngine`: segments, registration, batches, routing and notifications over whatever
//! transports, devices and metadata store are linked.

mod config;
mod peers;
mod segments;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

pub use config::{EngineConfig, join_host_port, split_host_port};

use crate::completion::Batch;
use crate::descriptor::{BufferDesc, SegmentDescriptor};
use crate::device::MemoryDevice;
use crate::error::{Error, Result};
use crate::memory::RegionTable;
use crate::metadata::{MetadataKeys, MetadataStore, RpcMeta};
use crate::registry;
use crate::rpc::{PeerRpc, RpcHandler};
use crate::sync;
use crate::transport::{BlockingRequest, PeerEvents, RemoteSegment, TransferTask, Transport, TransportContext};
use crate::types::{
    BatchId, Location, MemoryKind, Notification, Opcode, SegmentHandle, TransferRequest, TransferState, TransferStatus,
};
use peers::PeerDirectory;
use segments::SegmentCache;

/// The transfer engine. Cheap to clone; the last clone dropped shuts it down.
#[derive(Clone)]
pub struct TransferEngine {
    inner: Arc<Inner>,
}

struct Inner {
    config: EngineConfig,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    local_name: String,
    rpc_host: String,
    rpc_port: u16,
    keys: MetadataKeys,
    regions: Arc<RegionTable>,
    buffers: Mutex<BTreeMap<u64, BufferDesc>>,
    transports: Vec<Arc<dyn Transport>>,
    devices: Vec<Arc<dyn MemoryDevice>>,
    metadata: Arc<dyn MetadataStore>,
    rpc: Arc<dyn PeerRpc>,
    peers: Arc<PeerDirectory>,
    shared: Arc<Shared>,
    segments: SegmentCache,
    batches: Mutex<HashMap<BatchId, Arc<Batch>>>,
    next_batch: AtomicU64,
    /// Serializes descriptor publication so the newest state is the one stored.
    publish_lock: tokio::sync::Mutex<()>,
    /// The last publication did not reach the metadata service; the keeper retries it.
    publish_pending: std::sync::atomic::AtomicBool,
}

/// State the handshake server and the transports reach back into.
#[derive(Default)]
struct Shared {
    descriptor_json: RwLock<Arc<str>>,
    notifications: Mutex<VecDeque<Notification>>,
    transports: OnceLock<Vec<Arc<dyn Transport>>>,
    stale_peers: Mutex<Vec<String>>,
}

#[async_trait]
impl RpcHandler for Shared {
    fn local_descriptor(&self) -> String {
        sync::read(&self.descriptor_json).to_string()
    }

    fn on_notify(&self, notification: Notification) {
        let mut q = sync::lock(&self.notifications);
        if q.len() >= 1 << 16 {
            q.pop_front();
            tracing::warn!("notification queue full; dropping the oldest (drain it with get_notifies)");
        }
        q.push_back(notification);
    }

    async fn on_connection(&self, request: Value) -> Value {
        for t in self.transports.get().map(Vec::as_slice).unwrap_or_default() {
            if let Some(reply) = t.handle_handshake(&request).await {
                return reply.unwrap_or_else(|e| serde_json::json!({ "reply_msg": e.to_string() }));
            }
        }
        serde_json::json!({ "reply_msg": "no transport on this engine accepts connection handshakes" })
    }
}

impl PeerEvents for Shared {
    fn peer_failed(&self, segment_name: &str) {
        let mut v = sync::lock(&self.stale_peers);
        if !v.iter().any(|n| n == segment_name) {
            v.push(segment_name.to_string());
        }
    }
}

impl TransferEngine {
    /// Starts an engine (blocking): metadata client, handshake server, transports, publication.
    pub fn new(config: EngineConfig) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.worker_threads)
            .thread_name("mooncake-engine")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (tx, rx) = std::sync::mpsc::channel();
        handle.spawn(async move {
            let _ = tx.send(Inner::start(config).await);
        });
        let started = rx.recv().map_err(|_| Error::NotInitialized("engine start-up task died".into()));
        match started.and_then(|r| r) {
            Ok(mut inner) => {
                inner.runtime = Mutex::new(Some(runtime));
                let inner = Arc::new(inner);
                if !inner.config.is_p2p() && inner.config.republish_interval > Duration::ZERO {
                    handle.spawn(keeper(Arc::downgrade(&inner), inner.config.republish_interval));
                }
                Ok(TransferEngine { inner })
            }
            Err(e) => {
                runtime.shutdown_background();
                Err(e)
            }
        }
    }

    /// Upstream's `init(local_server_name, metadata_conn_string)` with the `tcp` transport.
    pub fn init(local_server_name: &str, metadata_conn: &str) -> Result<Self> {
        Self::new(EngineConfig::new(local_server_name, metadata_conn))
    }

    /// This engine's segment name (`host:port` in P2P mode).
    pub fn local_segment_name(&self) -> &str {
        &self.inner.local_name
    }

    /// The handshake (RPC) port.
    pub fn rpc_port(&self) -> u16 {
        self.inner.rpc_port
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Names of the installed transports, primary first.
    pub fn protocols(&self) -> Vec<String> {
        self.inner.transports.iter().map(|t| t.name().to_string()).collect()
    }

    /// The installed transport named `name`.
    pub fn transport(&self, name: &str) -> Option<Arc<dyn Transport>> {
        self.inner.transports.iter().find(|t| t.name() == name).cloned()
    }

    /// The memory device drivers usable here.
    pub fn devices(&self) -> &[Arc<dyn MemoryDevice>] {
        &self.inner.devices
    }

    /// The runtime the engine does its I/O on.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.inner.handle
    }

    /// The local registered-memory table.
    pub fn regions(&self) -> &Arc<RegionTable> {
        &self.inner.regions
    }

    /// The current local segment descriptor.
    pub fn local_descriptor(&self) -> SegmentDescriptor {
        self.inner.build_descriptor()
    }

    /// Runs `fut` on the engine runtime and blocks the calling thread for its result
    /// ([`Error::NotInitialized`] after shutdown). Never call from inside the engine's own runtime.
    pub fn block_on<F>(&self, fut: F) -> Result<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        block_on(&self.inner.handle, fut)
    }

    /// [`TransferEngine::block_on`] for fallible futures, flattened.
    fn run<T: Send + 'static>(&self, fut: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
        self.block_on(fut)?
    }

    // ---- memory registration -------------------------------------------------------------

    /// Registers `[addr, addr+len)` at `location` (`cpu:N`, `cuda:N`, `*` = detect) and
    /// republishes the descriptor. Zero length and overlap are typed errors.
    ///
    /// The memory must stay valid until unregistered: peers read and write it.
    pub fn register_memory(&self, addr: u64, len: u64, location: &str) -> Result<()> {
        self.register_memory_batch(&[(addr, len)], location)
    }

    /// Registers several buffers; all or none.
    pub fn register_memory_batch(&self, buffers: &[(u64, u64)], location: &str) -> Result<()> {
        let location: Location = location.parse()?;
        let inner = &self.inner;
        let mut done: Vec<u64> = Vec::with_capacity(buffers.len());
        let result = (|| {
            for &(addr, len) in buffers {
                let loc = inner.resolve_location(addr, len, &location)?;
                inner.regions.insert(addr, len, loc.clone())?;
                done.push(addr);
                let region = inner.regions.get(addr).ok_or_else(|| Error::NotFound("region just inserted".into()))?;
                let mut desc = BufferDesc { name: loc.to_string(), addr, length: len, ..Default::default() };
                for t in &inner.transports {
                    t.register_memory(&region, &mut desc)?;
                }
                sync::lock(&inner.buffers).insert(addr, desc);
            }
            Ok(())
        })();
        if let Err(e) = result {
            for addr in done {
                inner.forget_region(addr);
                let _ = inner.regions.remove(addr, Duration::ZERO);
            }
            return Err(e);
        }
        self.publish_blocking()
    }

    /// Unregisters the buffer starting at `addr`, waiting for in-flight remote accesses.
    pub fn unregister_memory(&self, addr: u64) -> Result<()> {
        self.unregister_memory_batch(&[addr])
    }

    /// Unregisters several buffers (each must start a registration).
    pub fn unregister_memory_batch(&self, addrs: &[u64]) -> Result<()> {
        let inner = &self.inner;
        for &addr in addrs {
            if inner.regions.get(addr).is_none() {
                return Err(Error::AddressNotRegistered {
                    addr,
                    len: 0,
                    context: "no registration starts at this address".into(),
                });
            }
        }
        let mut first_err = None;
        for &addr in addrs {
            inner.forget_region(addr);
            if let Err(e) = inner.regions.remove(addr, inner.config.unregister_wait) {
                first_err.get_or_insert(e);
            }
        }
        self.publish_blocking()?;
        first_err.map_or(Ok(()), Err)
    }

    fn publish_blocking(&self) -> Result<()> {
        let inner = self.inner.clone();
        self.run(async move { inner.publish_after_change().await })
    }

    // ---- segments --------------------------------------------------------------------------

    /// Opens (or returns the cached handle of) the segment `name`.
    pub async fn open_segment_async(&self, name: &str) -> Result<SegmentHandle> {
        let inner = self.inner.clone();
        let name = name.to_string();
        spawn_on(&self.inner.handle, async move { inner.open_segment(&name).await.map(|s| s.handle) }).await
    }

    /// Blocking form of [`TransferEngine::open_segment_async`] (upstream `openSegment`).
    pub fn open_segment(&self, name: &str) -> Result<SegmentHandle> {
        if let Some(seg) = self.inner.segments.cached_fresh(name) {
            return Ok(seg.handle);
        }
        let inner = self.inner.clone();
        let name = name.to_string();
        self.run(async move { inner.open_segment(&name).await.map(|s| s.handle) })
    }

    /// Re-reads a segment's descriptor from metadata (after the peer restarted or re-registered).
    pub fn refresh_segment(&self, handle: SegmentHandle) -> Result<Arc<RemoteSegment>> {
        let inner = self.inner.clone();
        self.run(async move { inner.refresh(handle).await })
    }

    /// The cached descriptor of an opened segment.
    pub fn segment(&self, handle: SegmentHandle) -> Result<Arc<RemoteSegment>> {
        self.inner.segments.get(handle)
    }

    /// Address of the first buffer of segment `name` (0 when it has none), as upstream.
    pub fn first_buffer_address(&self, name: &str) -> Result<u64> {
        let h = self.open_segment(name)?;
        Ok(self.inner.segments.get(h)?.descriptor.buffers.first().map_or(0, |b| b.addr))
    }

    // ---- batches ---------------------------------------------------------------------------

    /// Allocates a batch for up to `capacity` requests.
    pub fn allocate_batch(&self, capacity: usize) -> Result<BatchId> {
        if capacity == 0 {
            return Err(Error::InvalidArgument("batch capacity must be at least 1".into()));
        }
        let id = self.inner.next_batch.fetch_add(1, Ordering::Relaxed);
        sync::lock(&self.inner.batches).insert(id, Batch::new(capacity));
        Ok(id)
    }

    /// The batch object (to await or poll it directly).
    pub fn batch(&self, id: BatchId) -> Result<Arc<Batch>> {
        sync::lock(&self.inner.batches).get(&id).cloned().ok_or(Error::UnknownBatch(id))
    }

    /// Frees a batch; [`Error::BatchBusy`] while requests are in flight.
    pub fn free_batch(&self, id: BatchId) -> Result<()> {
        let mut map = sync::lock(&self.inner.batches);
        let batch = map.get(&id).ok_or(Error::UnknownBatch(id))?;
        if !batch.is_done() {
            return Err(Error::BatchBusy(id));
        }
        map.remove(&id);
        Ok(())
    }

    /// Submits requests into a batch (they accumulate up to its capacity). The whole submission
    /// is rejected, with nothing started, when any request is invalid.
    pub fn submit_transfer(&self, id: BatchId, requests: &[TransferRequest]) -> Result<()> {
        let batch = self.batch(id)?;
        self.submit_into(&batch, requests)
    }

    /// Submits into a batch object (see [`TransferEngine::submit_transfer`]).
    pub fn submit_into(&self, batch: &Arc<Batch>, requests: &[TransferRequest]) -> Result<()> {
        let plan = self.plan_blocking(requests)?;
        self.inner.launch(batch, requests, plan)
    }

    /// Validates and routes requests, re-reading stale descriptors once (blocking).
    fn plan_blocking(&self, requests: &[TransferRequest]) -> Result<Plan> {
        Ok(match self.inner.plan(requests, true) {
            Ok(plan) => plan,
            Err(Retry::Refresh(handles)) => {
                let inner = self.inner.clone();
                self.run(async move {
                    for h in handles {
                        inner.refresh(h).await?;
                    }
                    Ok::<_, Error>(())
                })?;
                self.inner.plan(requests, false).map_err(Retry::into_error)?
            }
            Err(Retry::Fail(e)) => return Err(e),
        })
    }

    /// Async form of submission + completion: runs the requests and returns one result per request
    /// (bytes moved or a typed error). Runtime-agnostic.
    pub async fn transfer(&self, requests: &[TransferRequest]) -> Result<Vec<Result<u64>>> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let plan = match self.inner.plan(requests, true) {
            Ok(plan) => plan,
            Err(Retry::Refresh(handles)) => {
                for h in handles {
                    let inner = self.inner.clone();
                    spawn_on(&self.inner.handle, async move { inner.refresh(h).await }).await?;
                }
                self.inner.plan(requests, false).map_err(Retry::into_error)?
            }
            Err(Retry::Fail(e)) => return Err(e),
        };
        let batch = Batch::new(requests.len());
        self.inner.launch(&batch, requests, plan)?;
        batch.wait().await;
        Ok(results(&batch))
    }

    /// Status of one request of a batch.
    pub fn transfer_status(&self, id: BatchId, task: usize) -> Result<TransferStatus> {
        self.batch(id)?.status(task)
    }

    /// Aggregate status of a batch.
    pub fn batch_status(&self, id: BatchId) -> Result<TransferStatus> {
        Ok(self.batch(id)?.overall())
    }

    // ---- sync helpers ----------------------------------------------------------------------

    /// Timeout of a sync call moving `bytes`: `MC_TRANSFER_TIMEOUT` plus 1 ns per byte.
    pub fn sync_timeout(&self, bytes: u64) -> Duration {
        self.inner.config.transfer_timeout + Duration::from_nanos(bytes)
    }

    /// Blocking read or write of one range (upstream `transfer_sync_*`).
    pub fn transfer_sync(&self, target: &str, opcode: Opcode, local: u64, remote: u64, len: u64) -> Result<()> {
        self.batch_transfer_sync(target, opcode, &[local], &[remote], &[len])
    }

    /// Blocking batch to one segment; fails with the first error. Times out per
    /// [`TransferEngine::sync_timeout`].
    pub fn batch_transfer_sync(
        &self,
        target: &str,
        opcode: Opcode,
        locals: &[u64],
        remotes: &[u64],
        lengths: &[u64],
    ) -> Result<()> {
        self.batch_transfer_sync_each(target, opcode, locals, remotes, lengths)?.into_iter().collect()
    }

    /// Blocking batch to one segment with one result per request, in order. `Err` is for the whole call
    /// (mismatched lists, unknown segment, a request that fails validation); a request that fails while moving
    /// data fails only its own entry, and entries still unfinished at [`TransferEngine::sync_timeout`] fail with
    /// `Timeout`. Transports with a caller-thread path run the requests on this thread
    /// ([`Transport::transfer_blocking`], [`Transport::transfer_blocking_batch`]).
    pub fn batch_transfer_sync_each(
        &self,
        target: &str,
        opcode: Opcode,
        locals: &[u64],
        remotes: &[u64],
        lengths: &[u64],
    ) -> Result<Vec<Result<()>>> {
        if locals.len() != remotes.len() || locals.len() != lengths.len() {
            return Err(Error::InvalidArgument(format!(
                "{} local addresses, {} remote addresses and {} lengths",
                locals.len(),
                remotes.len(),
                lengths.len()
            )));
        }
        if locals.is_empty() {
            return Ok(Vec::new());
        }
        let target_id = self.open_segment(target)?;
        let requests: Vec<TransferRequest> = (0..locals.len())
            .map(|i| TransferRequest {
                opcode,
                source: locals[i],
                target_id,
                target_offset: remotes[i],
                length: lengths[i],
            })
            .collect();
        let plan = self.plan_blocking(&requests)?;
        let timeout = self.sync_timeout(lengths.iter().sum());
        let (first, seg) = &plan.routes[0];
        if plan.routes.iter().all(|(t, _)| t == first) {
            // The calling thread may run them itself (no hand-off to the runtime and back).
            let transport = &self.inner.transports[*first];
            let direct = if let [r] = requests.as_slice() {
                transport
                    .transfer_blocking(seg, opcode, r.source, r.target_offset, r.length, timeout)
                    .map(|result| vec![result])
            } else {
                let pieces: Vec<BlockingRequest> = requests
                    .iter()
                    .map(|r| BlockingRequest { local_addr: r.source, remote_addr: r.target_offset, length: r.length })
                    .collect();
                transport.transfer_blocking_batch(seg, opcode, &pieces, timeout)
            };
            if let Some(results) = direct.filter(|r| r.len() == requests.len()) {
                return Ok(results.into_iter().map(|r| r.map(|_| ())).collect());
            }
        }
        let batch = Batch::new(requests.len());
        self.inner.launch(&batch, &requests, plan)?;
        // A timeout marks the unfinished requests; their statuses say so.
        let _ = batch.wait_blocking(timeout);
        Ok((0..requests.len())
            .map(|i| match batch.status(i) {
                Ok(s) if s.state == TransferState::Completed => Ok(()),
                Ok(s) => Err(s.error.unwrap_or_else(|| Error::Protocol(format!("transfer ended {:?}", s.state)))),
                Err(e) => Err(e),
            })
            .collect())
    }

    // ---- notifications and probes ------------------------------------------------------------

    /// Sends a notification to segment `target` through its handshake socket.
    pub async fn send_notify_async(&self, target: &str, notification: Notification) -> Result<()> {
        let inner = self.inner.clone();
        let target = target.to_string();
        spawn_on(&self.inner.handle, async move {
            let addr = inner.peers.rpc_addr(&target).await?;
            inner.rpc.notify(&addr, &notification).await
        })
        .await
    }

    /// Blocking form of [`TransferEngine::send_notify_async`].
    pub fn send_notify(&self, target: &str, notification: Notification) -> Result<()> {
        let inner = self.inner.clone();
        let target = target.to_string();
        self.run(async move {
            let addr = inner.peers.rpc_addr(&target).await?;
            inner.rpc.notify(&addr, &notification).await
        })
    }

    /// Takes every notification received so far, oldest first.
    pub fn drain_notifications(&self) -> Vec<Notification> {
        sync::lock(&self.inner.shared.notifications).drain(..).collect()
    }

    /// Checks that segment `target` answers on its handshake socket.
    pub fn probe_peer(&self, target: &str) -> Result<()> {
        let inner = self.inner.clone();
        let target = target.to_string();
        self.run(async move {
            let addr = inner.peers.rpc_addr(&target).await?;
            inner.rpc.probe(&addr).await
        })
    }

    /// Publishes the descriptor again (e.g. after the metadata service restarted).
    pub fn republish(&self) -> Result<()> {
        self.publish_blocking()
    }

    /// Stops serving, removes this engine's metadata keys and stops the runtime.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Per-request results of a finished batch.
fn results(batch: &Batch) -> Vec<Result<u64>> {
    (0..batch.len())
        .map(|i| match batch.status(i) {
            Ok(s) if s.state == crate::types::TransferState::Completed => Ok(s.transferred_bytes),
            Ok(s) => Err(s.error.unwrap_or(Error::Protocol(format!("request ended as {:?}", s.state)))),
            Err(e) => Err(e),
        })
        .collect()
}

/// A validated submission: (transport index, segment) per request.
struct Plan {
    routes: Vec<(usize, Arc<RemoteSegment>)>,
}

enum Retry {
    /// These segments must be re-read from metadata first.
    Refresh(Vec<SegmentHandle>),
    Fail(Error),
}

impl Retry {
    fn into_error(self) -> Error {
        match self {
            Retry::Fail(e) => e,
            Retry::Refresh(_) => Error::Metadata("segment descriptor is still stale after a refresh".into()),
        }
    }
}

impl From<Error> for Retry {
    fn from(e: Error) -> Self {
        Retry::Fail(e)
    }
}

impl Inner {
    async fn start(config: EngineConfig) -> Result<Inner> {
        let handle = tokio::runtime::Handle::current();
        let keys = MetadataKeys::new(config.cluster_id.as_deref());
        let metadata = registry::create_metadata(&config.metadata_conn)?;
        let rpc = registry::create_peer_rpc()?;
        let (host, port) = split_host_port(&config.local_server_name)?;
        let bind_host = config.bind_host.clone().unwrap_or_else(|| host.clone());
        let shared = Arc::new(Shared::default());
        let rpc_port = rpc.serve(&bind_host, port.unwrap_or(0), config.rpc_port_range, shared.clone()).await?;
        let name_from_port = config.is_p2p() || (config.name_with_rpc_port && port.is_none());
        let local_name =
            if name_from_port { join_host_port(&host, rpc_port) } else { config.local_server_name.clone() };

        if config.protocols.is_empty() {
            return Err(Error::InvalidArgument("at least one protocol is required".into()));
        }
        let regions = Arc::new(RegionTable::new());
        let devices = registry::available_devices();
        let peers = Arc::new(PeerDirectory {
            p2p: config.is_p2p(),
            metadata: metadata.clone(),
            keys: keys.clone(),
            rpc: rpc.clone(),
        });
        let ctx = TransportContext {
            local_name: local_name.clone(),
            bind_host: bind_host.clone(),
            regions: regions.clone(),
            runtime: handle.clone(),
            peer_events: shared.clone(),
            peers: peers.clone(),
            devices: devices.clone(),
        };
        let mut transports: Vec<Arc<dyn Transport>> = Vec::new();
        for name in &config.protocols {
            if transports.iter().any(|t| t.name() == name) {
                continue;
            }
            let t = registry::create_transport(name, &config.backend)?;
            t.start(&ctx).await?;
            transports.push(t);
        }
        for name in &config.auto_protocols {
            let linked = registry::transports().iter().any(|f| f.name == name);
            if !linked || transports.iter().any(|t| t.name() == name) {
                continue;
            }
            let started = match registry::create_transport(name, &config.backend) {
                Ok(t) => t.start(&ctx).await.map(|()| t),
                Err(e) => Err(e),
            };
            match started {
                Ok(t) => transports.push(t),
                Err(e) => tracing::info!(transport = %name, reason = %e, "optional transport not installed"),
            }
        }
        let _ = shared.transports.set(transports.clone());

        let inner = Inner {
            runtime: Mutex::new(None),
            handle,
            local_name,
            rpc_host: host,
            rpc_port,
            keys,
            regions,
            buffers: Mutex::new(BTreeMap::new()),
            transports,
            devices,
            metadata,
            rpc,
            peers,
            shared,
            segments: SegmentCache::default(),
            batches: Mutex::new(HashMap::new()),
            next_batch: AtomicU64::new(1),
            publish_lock: tokio::sync::Mutex::new(()),
            publish_pending: std::sync::atomic::AtomicBool::new(false),
            config,
        };
        inner.claim_rpc_meta().await?;
        inner.publish().await?;
        tracing::info!(segment = %inner.local_name, rpc_port, protocols = ?inner.config.protocols, "transfer engine started");
        Ok(inner)
    }

    fn resolve_location(&self, addr: u64, len: u64, requested: &Location) -> Result<Location> {
        if *requested != Location::Detect {
            return Ok(requested.clone());
        }
        // Specific devices (GPUs, CXL) first: host memory claims every address it is asked about.
        let specific = self.devices.iter().filter(|d| d.kind() != MemoryKind::Host);
        let host = self.devices.iter().filter(|d| d.kind() == MemoryKind::Host);
        for d in specific.chain(host) {
            if let Some(loc) = d.classify(addr, len) {
                return Ok(loc);
            }
        }
        Ok(Location::Cpu(Some(0)))
    }

    fn forget_region(&self, addr: u64) {
        if let Some(region) = self.regions.get(addr) {
            for t in &self.transports {
                if let Err(e) = t.unregister_memory(&region) {
                    tracing::warn!(transport = t.name(), error = %e, "unregister failed");
                }
            }
        }
        sync::lock(&self.buffers).remove(&addr);
    }

    fn build_descriptor(&self) -> SegmentDescriptor {
        let mut desc = SegmentDescriptor {
            name: self.local_name.clone(),
            protocol: self.transports.first().map(|t| t.name().to_string()).unwrap_or_default(),
            timestamp: timestamp_now(),
            buffers: sync::lock(&self.buffers).values().cloned().collect(),
            ..Default::default()
        };
        if self.transports.len() > 1 {
            let names: Vec<Value> = self.transports.iter().map(|t| Value::from(t.name())).collect();
            desc.fields.insert(crate::descriptor::FIELD_PROTOCOLS, Value::Array(names));
        }
        for t in &self.transports {
            t.describe(&mut desc);
        }
        desc
    }

    async fn publish(&self) -> Result<()> {
        let _g = self.publish_lock.lock().await;
        let json = self.build_descriptor().to_json();
        *sync::write(&self.shared.descriptor_json) = Arc::from(json.as_str());
        let r = self.metadata.put(&self.keys.segment(&self.local_name), json.as_bytes()).await;
        self.publish_pending.store(r.is_err(), std::sync::atomic::Ordering::Release);
        r
    }

    /// Publishes after a local change. While the metadata service is unreachable the change
    /// still takes effect here (P2P peers and cached peers see it); the keeper publishes it once
    /// the service is back.
    async fn publish_after_change(&self) -> Result<()> {
        match self.publish().await {
            Err(Error::Unavailable { reason }) if self.config.republish_interval > Duration::ZERO => {
                tracing::warn!(%reason, "metadata service unreachable; the descriptor will be published when it is back");
                Ok(())
            }
            r => r,
        }
    }

    fn rpc_meta_json(&self) -> Result<String> {
        let meta = RpcMeta { ip_or_host_name: self.rpc_host.clone(), rpc_port: self.rpc_port };
        Ok(serde_json::to_string(&meta)?)
    }

    /// Puts this engine's `rpc_meta`. A server that refuses to replace an existing one (upstream's
    /// HTTP server) gets it deleted first when the engine it names no longer answers.
    async fn claim_rpc_meta(&self) -> Result<()> {
        let key = self.keys.rpc_meta(&self.local_name);
        let json = self.rpc_meta_json()?;
        match self.metadata.put(&key, json.as_bytes()).await {
            Err(Error::AlreadyExists(why)) => {
                let old = self.metadata.get(&key).await?.unwrap_or_default();
                let old_addr = serde_json::from_slice::<RpcMeta>(&old)
                    .map(|m| join_host_port(&m.ip_or_host_name, m.rpc_port))
                    .unwrap_or_default();
                let alive = !old_addr.is_empty()
                    && tokio::time::timeout(Duration::from_secs(3), self.rpc.probe(&old_addr))
                        .await
                        .is_ok_and(|r| r.is_ok());
                if alive {
                    return Err(Error::AlreadyExists(format!(
                        "segment name {:?} is in use by a live engine at {old_addr} ({why})",
                        self.local_name
                    )));
                }
                tracing::warn!(segment = %self.local_name, stale = %old_addr, "replacing the rpc_meta of an engine that no longer answers");
                self.metadata.delete(&key).await?;
                self.metadata.put(&key, json.as_bytes()).await
            }
            r => r,
        }
    }

    /// One round of the keeper: puts back keys the metadata service lost (it restarted empty)
    /// and publications that failed while it was down.
    async fn keep_published(&self) -> Result<()> {
        let key = self.keys.rpc_meta(&self.local_name);
        let want = self.rpc_meta_json()?;
        let present = self.metadata.get(&key).await?;
        let lost = present.as_deref() != Some(want.as_bytes());
        if lost {
            tracing::info!(segment = %self.local_name, "metadata service lost this engine's keys; publishing them again");
            self.claim_rpc_meta().await?;
        }
        if lost || self.publish_pending.load(std::sync::atomic::Ordering::Acquire) {
            self.publish().await?;
        }
        Ok(())
    }

    async fn open_segment(&self, name: &str) -> Result<Arc<RemoteSegment>> {
        if let Some(seg) = self.segments.cached_fresh(name) {
            return Ok(seg);
        }
        let handle = self.segments.handle_for(name);
        self.refresh(handle).await
    }

    async fn refresh(&self, handle: SegmentHandle) -> Result<Arc<RemoteSegment>> {
        let name = self.segments.name_of(handle)?;
        let descriptor = self.peers.fetch_descriptor(&name).await?;
        // A transport whose section publishes its own data host (upstream tcp's) prefers that itself.
        let host = self.peers.data_host(&name).await?;
        let seg = Arc::new(RemoteSegment { handle, name: name.clone(), host, descriptor });
        let changed = self.segments.store(seg.clone());
        if changed {
            for t in &self.transports {
                t.forget_peer(&name);
            }
        }
        Ok(seg)
    }

    /// Picks the transport for a request to `seg` by the target's protocols and the cost model.
    /// A transport that needs registered local memory ranks last when the source range is not
    /// registered, so another transport that can send from anywhere takes the request.
    ///
    /// Returns the transport index and, when the source range had to be looked up, whether it is
    /// registered (so the caller does not look it up again).
    fn route(&self, seg: &RemoteSegment, source: u64, length: u64) -> Result<(usize, Option<bool>)> {
        let priority = &self.config.protocol_priority;
        let mut local_registered = None;
        let mut best: Option<(usize, (bool, usize, Duration, usize))> = None;
        for (i, t) in self.transports.iter().enumerate() {
            let Some(order) = seg.descriptor.protocol_rank(t.name()) else { continue };
            if !t.can_reach(seg) {
                continue;
            }
            let unmet = t.capabilities().requires_local_registration
                && !*local_registered.get_or_insert_with(|| self.regions.lookup(source, length).is_some());
            // Listed protocols first, in list order; unlisted ones after them.
            let rank = priority.iter().position(|n| n == t.name()).unwrap_or(priority.len());
            let key = (unmet, rank, t.capabilities().model.estimate(length), order);
            if best.as_ref().is_none_or(|(_, k)| key < *k) {
                best = Some((i, key));
            }
        }
        best.map(|(i, _)| (i, local_registered)).ok_or_else(|| {
            Error::unavailable(format!(
                "segment {:?} offers {:?}; this engine has {:?} and none of them can reach it",
                seg.name,
                seg.descriptor.protocols(),
                self.transports.iter().map(|t| t.name()).collect::<Vec<_>>()
            ))
        })
    }

    fn plan(&self, requests: &[TransferRequest], may_refresh: bool) -> std::result::Result<Plan, Retry> {
        let stale: Vec<String> = std::mem::take(&mut *sync::lock(&self.shared.stale_peers));
        for name in stale {
            self.segments.mark_stale(&name);
        }
        let mut routes = Vec::with_capacity(requests.len());
        let mut refresh = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            if r.length == 0 {
                return Err(Error::InvalidArgument(format!("request {i} has zero length")).into());
            }
            if r.source.checked_add(r.length).is_none() || r.target_offset.checked_add(r.length).is_none() {
                return Err(Error::InvalidArgument(format!("request {i}: address + length overflows")).into());
            }
            let (seg, fresh) = self.segments.get_with_freshness(r.target_id)?;
            let inside = seg.descriptor.find_buffer(r.target_offset, r.length).is_some();
            if may_refresh && (!fresh || !inside) {
                // The descriptor may be outdated (peer restarted or registered more memory).
                if !refresh.contains(&r.target_id) {
                    refresh.push(r.target_id);
                }
                continue;
            }
            if !inside {
                return Err(Error::AddressNotRegistered {
                    addr: r.target_offset,
                    len: r.length,
                    context: format!("request {i}: not inside any buffer of segment {}", seg.name),
                }
                .into());
            }
            let (t, local_registered) = self.route(&seg, r.source, r.length)?;
            let caps = self.transports[t].capabilities();
            if caps.requires_local_registration && local_registered != Some(true) {
                self.regions.check(r.source, r.length, "local buffer")?;
            }
            if r.length > caps.max_request_size {
                return Err(Error::InvalidArgument(format!(
                    "request {i}: {} bytes exceeds {}'s limit of {}",
                    r.length,
                    self.transports[t].name(),
                    caps.max_request_size
                ))
                .into());
            }
            routes.push((t, seg));
        }
        if !refresh.is_empty() {
            // A refresh happened already in this call if the caller retries; report the range then.
            return Err(Retry::Refresh(refresh));
        }
        Ok(Plan { routes })
    }

    fn launch(&self, batch: &Arc<Batch>, requests: &[TransferRequest], plan: Plan) -> Result<()> {
        let start = batch.reserve(requests.len())?;
        // Group consecutive requests by (transport, segment) so each transport gets one call.
        let mut i = 0;
        while i < requests.len() {
            let (t, seg) = &plan.routes[i];
            let mut j = i + 1;
            while j < requests.len() && plan.routes[j].0 == *t && plan.routes[j].1.handle == seg.handle {
                j += 1;
            }
            let tasks: Vec<TransferTask> = (i..j)
                .map(|k| TransferTask {
                    opcode: requests[k].opcode,
                    local_addr: requests[k].source,
                    remote_addr: requests[k].target_offset,
                    length: requests[k].length,
                    completion: batch.completion(start + k),
                })
                .collect();
            self.transports[*t].submit(seg, tasks);
            i = j;
        }
        Ok(())
    }

    fn shutdown(&self) {
        let Some(runtime) = sync::lock(&self.runtime).take() else { return };
        let metadata = self.metadata.clone();
        let rpc = self.rpc.clone();
        let transports = self.transports.clone();
        let keys = [self.keys.segment(&self.local_name), self.keys.rpc_meta(&self.local_name)];
        let (tx, rx) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            for k in &keys {
                let _ = tokio::time::timeout(Duration::from_secs(2), metadata.delete(k)).await;
            }
            metadata.close().await;
            rpc.shutdown().await;
            for t in transports {
                t.shutdown().await;
            }
            let _ = tx.send(());
        });
        let _ = rx.recv_timeout(Duration::from_secs(5));
        runtime.shutdown_background();
    }
}

/// Keeps a metadata-mode engine's keys published until the engine is gone.
async fn keeper(inner: std::sync::Weak<Inner>, every: Duration) {
    let mut failing = false;
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else { return };
        if sync::lock(&inner.runtime).is_none() {
            return;
        }
        match inner.keep_published().await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(segment = %inner.local_name, "metadata service reachable again; keys are published");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(segment = %inner.local_name, error = %e, "checking this engine's metadata keys failed; retrying");
            }
            Err(_) => {}
        }
        if Arc::strong_count(&inner) == 1 {
            // The engine was dropped during this round: shut it down off the runtime it owns.
            std::thread::spawn(move || drop(inner));
            return;
        }
    }
}

/// Runs `fut` on `handle` and blocks the current thread for the output; fails with
/// [`Error::NotInitialized`] once the engine runtime has stopped.
fn block_on<F>(handle: &tokio::runtime::Handle, fut: F) -> Result<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| Error::NotInitialized("the engine was shut down".into()))
}

/// Runs `fut` on `handle` and awaits it from any runtime.
async fn spawn_on<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    fut: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    handle.spawn(fut).await.map_err(|e| Error::NotInitialized(format!("engine task failed: {e}")))?
}

/// Upstream-style timestamp `YYYY-mm-dd HH:MM:SS.ffffff` (UTC).
fn timestamp_now() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil-from-days (Howard Hinnant), valid for the Unix era.
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:06}", rem / 3600, rem % 3600 / 60, rem % 60, now.subsec_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_shape() {
        let t = timestamp_now();
        assert_eq!(t.len(), 26, "{t}");
        assert!(t.starts_with("20"), "{t}");
    }
}
