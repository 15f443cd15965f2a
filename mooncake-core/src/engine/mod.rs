//! `TransferEngine`: segments, registration, batches, routing and notifications over whatever
//! transports, devices and metadata store are linked.
//!
//! This module holds the engine's state, its start and shutdown, and notifications. The rest is split by
//! concern: `registration` (memory regions), `publication` (the descriptor, `rpc_meta` and their keeper),
//! `routing` (segments, transport choice, validation into a plan), `submission` (batches, the async call and
//! the blocking calls), `transfers` (the typed blocking entry point over many segments), `unchecked` (the
//! `unsafe` calls with vouched local ranges), `segments` / `peers` (the caches behind routing), `config` and
//! `timestamp`.

mod config;
mod peers;
mod publication;
mod registration;
mod routing;
mod segments;
mod submission;
mod timestamp;
mod transfers;
mod unchecked;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

pub use config::{EngineConfig, join_host_port, split_host_port};
pub use transfers::{CALLER_THREAD_MAX_BYTES, PendingTransfers, Transfer};
pub use unchecked::UncheckedTransfers;

use crate::completion::Batch;
use crate::descriptor::{BufferDesc, SegmentDescriptor};
use crate::device::MemoryDevice;
use crate::error::{Error, Result};
use crate::memory::RegionTable;
use crate::metadata::{MetadataKeys, MetadataStore};
use crate::registry;
use crate::rpc::{PeerRpc, RpcHandler};
use crate::sync;
use crate::transport::{PeerEvents, Transport, TransportContext};
use crate::types::{BatchId, Notification};
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
                    handle.spawn(publication::keeper(Arc::downgrade(&inner), inner.config.republish_interval));
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
