//! Setup, liveness (ping thread, remount, health) and teardown of a client.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mooncake_core::sync::{self, lock};
use mooncake_core::{
    AllocOptions, Allocation as DeviceAllocation, EngineConfig, MemoryDevice, MemoryKind, RegionGuard, TransferEngine,
    split_host_port,
};

use super::config::ClientConfig;
use super::errors;
use super::master::{Master, wrong_kind};
use super::staging::Staging;
use crate::error::{Error, Result};
use crate::protocol::{Request, Response};
use crate::types::PingOutcome;
use crate::types::{CXL_POOL_SEGMENT, ClientId, ErrorCode, ReplicaDescriptor, Segment};

/// `health()`: the master answered the last ping.
pub const HEALTH_OK: i32 = 0;
/// `health()`: the client is not set up, or closed.
pub const HEALTH_NOT_INITIALIZED: i32 = 1;
/// `health()`: the master did not answer the last ping.
pub const HEALTH_MASTER_UNREACHABLE: i32 = 2;

/// Default name of the shared area of the CXL device where every client with `protocol = "cxl"` finds the
/// master's CXL pool ([`MemoryDevice::attach_named`]; reserved by the first client, as large as the device's free
/// space). Clusters sharing one device name their own areas with [`CXL_STORE_AREA_ENV`].
pub const CXL_STORE_AREA: &str = "mooncake-store";

/// Variable naming the store's shared CXL area (default [`CXL_STORE_AREA`]): every client of one master must use
/// the same name, and each master sharing a device with others its own (one master per area).
pub const CXL_STORE_AREA_ENV: &str = "MC_CXL_STORE_AREA";

/// The store's shared CXL area for this process: [`CXL_STORE_AREA_ENV`], else [`CXL_STORE_AREA`].
fn cxl_store_area() -> String {
    std::env::var(CXL_STORE_AREA_ENV).ok().filter(|v| !v.trim().is_empty()).unwrap_or_else(|| CXL_STORE_AREA.into())
}

/// Ports a client's engine picks its handshake port from when its host name has none, as upstream's store.
const STORE_RPC_PORTS: (u16, u16) = (12300, 14300);

/// How long an unreachable endpoint stays reported: further failures inside this window send no new report.
const REPORT_WINDOW: Duration = Duration::from_secs(1);

/// Our contributed memory and how the master knows it.
pub(crate) struct OwnedSegment {
    pub(crate) memory: DeviceAllocation,
    pub(crate) info: Segment,
    /// The device `memory` came from (host memory, or the CXL device for a view of the master's CXL pool).
    pub(crate) device: Arc<dyn MemoryDevice>,
}

impl OwnedSegment {
    /// True when `[addr, addr+len)` lies inside this segment.
    pub(crate) fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.memory.addr
            && addr.checked_add(len).is_some_and(|end| end <= self.memory.addr.saturating_add(self.memory.len))
    }
}

#[derive(Default)]
struct PingState {
    last: Option<Instant>,
    reachable: bool,
}

/// Stop switch of the ping and task threads, shared without keeping the client alive.
#[derive(Default)]
pub(crate) struct PingControl {
    stop: Mutex<bool>,
    wake: Condvar,
}

impl PingControl {
    /// Waits `interval` (less if told to stop); false once told to stop.
    pub(crate) fn sleep(&self, interval: Duration) -> bool {
        let stop = lock(&self.stop);
        let (stop, _) = self.wake.wait_timeout_while(stop, interval, |s| !*s).unwrap_or_else(|p| p.into_inner());
        !*stop
    }
}

/// Everything a client owns. Shared by clones of [`super::StoreClient`].
pub(crate) struct Inner {
    pub(crate) config: ClientConfig,
    pub(crate) id: ClientId,
    pub(crate) endpoint: String,
    pub(crate) engine: TransferEngine,
    /// False when the engine was handed in ([`crate::client::StoreClient::with_engine`]): close leaves it running.
    pub(crate) owns_engine: bool,
    pub(crate) device: Arc<dyn MemoryDevice>,
    pub(crate) master: Master,
    pub(crate) segment: Option<OwnedSegment>,
    pub(crate) staging: Option<Staging>,
    pub(crate) prefault: Arc<Prefault>,
    /// True while the client is usable; every operation holds a read guard, `close` takes the write lock.
    open: RwLock<bool>,
    ping: Mutex<PingState>,
    control: Arc<PingControl>,
    ping_thread: Mutex<Option<JoinHandle<()>>>,
    task_thread: Mutex<Option<JoinHandle<()>>>,
    reported: Mutex<HashMap<String, Instant>>,
    /// Open put sessions and replicas cached by get sessions.
    pub(crate) sessions: super::session::Sessions,
    /// Segments mounted after setup.
    pub(crate) extras: RwLock<Vec<super::segments::ExtraSegment>>,
}

/// Whether the background prefault of the segment has ended (or there was none to do).
#[derive(Default)]
pub(crate) struct Prefault {
    done: Mutex<bool>,
    ended: Condvar,
}

impl Prefault {
    fn finish(&self) {
        *lock(&self.done) = true;
        self.ended.notify_all();
    }

    /// Waits up to `timeout` for the prefault to end; true when it has.
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        let done = lock(&self.done);
        let (done, _) = self.ended.wait_timeout_while(done, timeout, |d| !*d).unwrap_or_else(|p| p.into_inner());
        *done
    }
}

/// Faults the segment's pages in on a background thread, so that the first objects written into it
/// (by peers, or by this process) do not pay a page fault per page. The device keeps the memory
/// valid during the call even if `close` frees it meanwhile; a failure only costs speed. `state` is
/// finished when the thread ends (or could not start).
fn prefault_in_background(device: &Arc<dyn MemoryDevice>, memory: &DeviceAllocation, state: &Arc<Prefault>) {
    let (device, memory, done) = (device.clone(), memory.clone(), state.clone());
    let spawned = std::thread::Builder::new().name("mooncake-store-prefault".into()).spawn(move || {
        let started = Instant::now();
        match device.prefault(&memory) {
            Ok(()) => tracing::debug!(len = memory.len, took = ?started.elapsed(), "segment pages faulted in"),
            Err(e) => tracing::debug!(error = %e, "segment not prefaulted; pages fault in on first use"),
        }
        done.finish();
    });
    if let Err(e) = spawned {
        tracing::debug!(error = %e, "no prefault thread; pages fault in on first use");
        state.finish();
    }
}

/// What `setup` built so far; torn down on drop unless taken.
#[derive(Default)]
struct Partial {
    engine: Option<TransferEngine>,
    /// Whether `engine` was started by this setup (and so is shut down on failure) or handed in by the caller.
    owns_engine: bool,
    device: Option<Arc<dyn MemoryDevice>>,
    /// Allocated (and maybe registered) memory: `(allocation, registered, its device)`.
    memory: Vec<(DeviceAllocation, bool, Arc<dyn MemoryDevice>)>,
}

impl Partial {
    fn allocate_registered(&mut self, len: u64, what: &str) -> Result<DeviceAllocation> {
        let (Some(engine), Some(device)) = (&self.engine, &self.device) else { return Err(ErrorCode::Internal.into()) };
        let memory = device.allocate(len, &memory_options()).map_err(|e| errors::engine(what, &e))?;
        self.memory.push((memory.clone(), false, device.clone()));
        engine.register_allocation(device, &memory, "*").map_err(|e| errors::engine(what, &e))?;
        if let Some(last) = self.memory.last_mut() {
            last.1 = true;
        }
        Ok(memory)
    }
}

impl Partial {
    /// Attaches this process to the store's shared area of the CXL device ([`CXL_STORE_AREA_ENV`]), registers it
    /// and describes it as the client's view of the master's CXL pool: `base` is the area's offset in the
    /// device (where every client finds the same bytes), `size` its length.
    fn attach_cxl_view(&mut self, endpoint: &str, host: &str) -> Result<OwnedSegment> {
        let Some(engine) = self.engine.clone() else { return Err(ErrorCode::Internal.into()) };
        let Some(device) = engine.devices().iter().find(|d| d.kind() == MemoryKind::Cxl).cloned() else {
            tracing::error!(
                "protocol \"cxl\" needs the CXL device: set MC_CXL_DEV_PATH (a DAX device or a file) and build with \
                 the cxl feature"
            );
            return Err(ErrorCode::InvalidParams.into());
        };
        let memory = device
            .attach_named(&cxl_store_area(), 0)
            .map_err(|e| errors::engine("cannot attach the store's CXL area", &e))?;
        self.memory.push((memory.clone(), false, device.clone()));
        let exported =
            device.export_handle(&memory).map_err(|e| errors::engine("cannot locate the store's CXL area", &e))?;
        let offset = <[u8; 8]>::try_from(exported.data.as_slice()).map(u64::from_le_bytes).map_err(|_| {
            tracing::error!(handle = ?exported.data, "the CXL device did not say where the store's area lies");
            ErrorCode::Internal
        })?;
        engine
            .register_allocation(&device, &memory, "*")
            .map_err(|e| errors::engine("cannot register the store's CXL area", &e))?;
        if let Some(last) = self.memory.last_mut() {
            last.1 = true;
        }
        tracing::info!(offset, len = memory.len, "store client maps the shared CXL area");
        let info = Segment {
            name: endpoint.to_string(),
            transport_endpoint: endpoint.to_string(),
            base: offset,
            size: memory.len,
            host: host.to_string(),
            protocol: "cxl".into(),
        };
        Ok(OwnedSegment { memory, info, device })
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        for (memory, registered, device) in self.memory.drain(..).rev() {
            if let (true, Some(engine)) = (registered, &self.engine) {
                let _ = engine.unregister_memory(memory.addr);
            }
            let _ = device.free(&memory);
        }
        if let (Some(engine), true) = (self.engine.take(), self.owns_engine) {
            engine.shutdown();
        }
    }
}

impl Inner {
    /// Connects to the master, starts the engine (or uses `shared`, which it then never shuts down), allocates,
    /// registers and mounts the segment, allocates the staging buffer and starts the ping thread.
    pub(crate) fn setup(config: ClientConfig, shared: Option<TransferEngine>) -> Result<Arc<Inner>> {
        config.validate()?;
        let (host, _) = split_host_port(&config.local_hostname).map_err(|e| {
            tracing::warn!(local_hostname = %config.local_hostname, error = %e, "invalid local hostname");
            ErrorCode::InvalidParams
        })?;
        let mut partial = Partial::default();
        let id = ClientId::random();
        let master = Master::connect(&config.master_server_addr, id, config.setup_timeout, config.rpc_timeout)?;

        let owns_engine = shared.is_none();
        let engine = match shared {
            Some(engine) => {
                tracing::info!(segment = %engine.local_segment_name(), "store client shares the caller's engine");
                engine
            }
            None => start_engine(&config)?,
        };
        let endpoint = engine.local_segment_name().to_string();
        partial.engine = Some(engine.clone());
        partial.owns_engine = owns_engine;
        let device = engine.devices().iter().find(|d| d.kind() == MemoryKind::Host).cloned().ok_or_else(|| {
            tracing::warn!("no host memory device is linked; call mooncake::link_all() in the final binary");
            ErrorCode::TransferFail
        })?;
        partial.device = Some(device.clone());

        let segment = match config.global_segment_size {
            0 => None,
            _ if config.protocol == "cxl" => Some(partial.attach_cxl_view(&endpoint, &host)?),
            size => {
                let memory = partial.allocate_registered(size, "cannot allocate the global segment")?;
                let info = Segment {
                    name: endpoint.clone(),
                    transport_endpoint: endpoint.clone(),
                    base: memory.addr,
                    size: memory.len,
                    host: host.clone(),
                    protocol: config.protocol.clone(),
                };
                Some(OwnedSegment { memory, info, device: device.clone() })
            }
        };
        let staging = match config.local_buffer_size {
            0 => None,
            size => Some(Staging::new(partial.allocate_registered(size, "cannot allocate the staging buffer")?)),
        };
        let prefault = Arc::new(Prefault::default());
        match &segment {
            // A CXL view is not prefaulted: the device's pages may be a sparse file, and the view is large.
            Some(seg) if seg.info.protocol == "cxl" => {
                mount(&master, id, &seg.info)?;
                prefault.finish();
            }
            Some(seg) => {
                mount(&master, id, &seg.info)?;
                prefault_in_background(&device, &seg.memory, &prefault);
            }
            None => prefault.finish(),
        }

        partial.memory.clear();
        partial.engine = None;
        drop(partial);
        let ping_interval = config.ping_interval;
        let inner = Arc::new(Inner {
            config,
            id,
            endpoint,
            engine,
            owns_engine,
            device,
            master,
            segment,
            staging,
            prefault,
            open: RwLock::new(true),
            ping: Mutex::new(PingState { last: Some(Instant::now()), reachable: true }),
            control: Arc::new(PingControl::default()),
            ping_thread: Mutex::new(None),
            task_thread: Mutex::new(None),
            reported: Mutex::new(HashMap::new()),
            sessions: Default::default(),
            extras: RwLock::new(Vec::new()),
        });
        let weak = Arc::downgrade(&inner);
        let control = inner.control.clone();
        let thread = std::thread::Builder::new()
            .name("mooncake-store-ping".into())
            .spawn(move || ping_loop(weak, control, ping_interval));
        match thread {
            Ok(t) => *lock(&inner.ping_thread) = Some(t),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the ping thread");
                inner.close();
                return Err(ErrorCode::Internal.into());
            }
        }
        let (weak, control) = (Arc::downgrade(&inner), inner.control.clone());
        let thread = std::thread::Builder::new()
            .name("mooncake-store-tasks".into())
            .spawn(move || super::tasks::task_loop(weak, control, ping_interval));
        match thread {
            Ok(t) => *lock(&inner.task_thread) = Some(t),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the task thread");
                inner.close();
                return Err(ErrorCode::Internal.into());
            }
        }
        tracing::info!(client = %inner.id, segment = %inner.endpoint, master = %inner.config.master_server_addr, "store client ready");
        Ok(inner)
    }

    /// A read guard proving the client is open, or `UnavailableInCurrentStatus` after `close`.
    pub(crate) fn op(&self) -> Result<RwLockReadGuard<'_, bool>> {
        let g = sync::read(&self.open);
        if *g { Ok(g) } else { Err(ErrorCode::UnavailableInCurrentStatus.into()) }
    }

    /// Unmounts, unregisters and frees, stops the ping thread and the engine. Idempotent.
    pub(crate) fn close(&self) {
        {
            let mut open = sync::write(&self.open);
            if !*open {
                return;
            }
            *open = false;
        }
        *lock(&self.control.stop) = true;
        self.control.wake.notify_all();
        for thread in [&self.ping_thread, &self.task_thread] {
            if let Some(t) = lock(thread).take() {
                if t.thread().id() != std::thread::current().id() {
                    let _ = t.join();
                }
            }
        }
        self.unmount_all_extras();
        if let Some(seg) = &self.segment {
            let req = Request::UnmountSegment { client: self.id, name: seg.info.name.clone() };
            match self.master.call_with(&req, self.config.rpc_timeout.min(Duration::from_secs(2))) {
                Ok(Response::Done(Ok(()))) => {}
                Ok(Response::Done(Err(e))) => tracing::info!(error = %e, "master refused to unmount our segment"),
                Ok(other) => {
                    wrong_kind("unmount_segment", &other);
                }
                Err(_) => tracing::info!("could not unmount our segment; the master drops it when our pings stop"),
            }
        }
        let memories = self
            .staging
            .iter()
            .map(|s| (&s.memory, &self.device))
            .chain(self.segment.iter().map(|s| (&s.memory, &s.device)));
        for (memory, device) in memories {
            match self.engine.unregister_memory(memory.addr) {
                Ok(()) => {
                    if let Err(e) = device.free(memory) {
                        tracing::warn!(error = %e, "cannot free client memory");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot unregister client memory; leaking it"),
            }
        }
        if self.owns_engine {
            self.engine.shutdown();
        }
        tracing::info!(client = %self.id, "store client closed");
    }

    /// Pings the master (remounting our segment when it asks) and records the outcome. True when it answered.
    fn ping_once(&self, timeout: Duration) -> bool {
        let reachable = match self.master.ping(self.id, timeout) {
            Ok(PingOutcome::Ok) => true,
            Ok(PingOutcome::NeedRemount) => {
                if let Some(seg) = &self.segment {
                    match mount(&self.master, self.id, &seg.info) {
                        Ok(()) => tracing::info!(segment = %seg.info.name, "remounted our segment on the master"),
                        Err(e) => tracing::warn!(segment = %seg.info.name, error = %e, "remount failed"),
                    }
                }
                self.remount_extras();
                true
            }
            Err(_) => false,
        };
        let mut state = lock(&self.ping);
        if state.reachable != reachable {
            if reachable {
                tracing::info!(master = %self.config.master_server_addr, "master reachable again");
            } else {
                tracing::warn!(master = %self.config.master_server_addr, "master unreachable");
            }
        }
        *state = PingState { last: Some(Instant::now()), reachable };
        reachable
    }

    /// 0 ok, 1 closed, 2 master unreachable; pings afresh when the last ping is older than two intervals.
    pub(crate) fn health(&self) -> i32 {
        let Ok(_open) = self.op() else { return HEALTH_NOT_INITIALIZED };
        let (last, reachable) = {
            let s = lock(&self.ping);
            (s.last, s.reachable)
        };
        let fresh_for = self.config.ping_interval * 2 + Duration::from_millis(100);
        let reachable = match last {
            Some(t) if t.elapsed() <= fresh_for => reachable,
            _ => self.ping_once(self.config.rpc_timeout.min(Duration::from_secs(2))),
        };
        if reachable { HEALTH_OK } else { HEALTH_MASTER_UNREACHABLE }
    }

    /// Tells the master (once per endpoint per [`REPORT_WINDOW`], without waiting) that `endpoint` failed at the
    /// connection level.
    pub(crate) fn report_unreachable(&self, endpoint: &str) {
        if endpoint == self.endpoint {
            return;
        }
        {
            let mut reported = lock(&self.reported);
            let now = Instant::now();
            if reported.get(endpoint).is_some_and(|t| now.duration_since(*t) < REPORT_WINDOW) {
                return;
            }
            reported.retain(|_, t| now.duration_since(*t) < REPORT_WINDOW);
            reported.insert(endpoint.to_string(), now);
        }
        tracing::warn!(endpoint, "peer unreachable; reporting it to the master");
        self.master.fire_and_forget(Request::ReportUnreachable { target: endpoint.to_string() });
    }

    /// The registration holding a caller's range `[ptr, ptr+len)`: null, zero length, wrap-around, a range not
    /// inside one registered buffer, or one inside the client's own segment or staging buffer (not the
    /// caller's to use) give `InvalidParams`.
    pub(crate) fn user_region(&self, ptr: u64, len: u64) -> Result<RegionGuard> {
        if ptr == 0 || len == 0 {
            return Err(ErrorCode::InvalidParams.into());
        }
        let guard = self.engine.regions().lookup(ptr, len).ok_or_else(|| {
            tracing::debug!(ptr, len, "range is not inside a registered buffer");
            ErrorCode::InvalidParams
        })?;
        let internal = self.segment.iter().map(|s| s.memory.addr).chain(self.staging.iter().map(|s| s.memory.addr));
        let extra = || sync::read(&self.extras).iter().any(|s| s.memory.addr == guard.addr);
        if internal.into_iter().any(|base| base == guard.addr) || extra() {
            tracing::debug!(ptr, len, "range lies in the client's own segment or staging buffer");
            return Err(ErrorCode::InvalidParams.into());
        }
        Ok(guard)
    }

    /// True when a replica at (`endpoint`, `addr`, `len`) is in our own segment (copy it with memcpy).
    /// Where `replica`'s bytes are in this process, when they lie in memory it holds: one of its own segments
    /// (the replica's endpoint is ours), or the master's shared CXL pool when this client maps a view of it
    /// (the replica's address is then an offset in the device). `None` for replicas reached through the engine.
    pub(crate) fn own_addr(&self, replica: &ReplicaDescriptor) -> Option<u64> {
        let (addr, len) = (replica.addr, replica.len);
        if replica.segment == CXL_POOL_SEGMENT {
            let view = self.segment.as_ref().filter(|s| s.info.protocol == "cxl")?;
            let offset = addr.checked_sub(view.info.base)?;
            return (offset.checked_add(len)? <= view.memory.len).then(|| view.memory.addr + offset);
        }
        let own = replica.transport_endpoint == self.endpoint
            && (self.segment.as_ref().is_some_and(|s| s.info.protocol != "cxl" && s.contains(addr, len))
                || sync::read(&self.extras).iter().any(|s| s.contains(addr, len)));
        own.then_some(addr)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.close();
    }
}

/// Starts the client's own engine from the config: its host name, metadata server, protocol (plus the same-host
/// transports when enabled) and devices.
fn start_engine(config: &ClientConfig) -> Result<TransferEngine> {
    let mut engine_config = EngineConfig::new(config.local_hostname.clone(), config.metadata_server.clone());
    // As upstream's store: a host without a port gets one (the engine's), so clients that share a host
    // name ("localhost") each own a segment.
    engine_config.name_with_rpc_port = true;
    // Upstream's store picks that port from 12300-14300 (measured: `localhost:14117` with a metadata server,
    // `localhost:13028` in P2P mode), not from the engine's 15000-17000; MC_MIN/MAX_RPC_PORT still rule.
    if std::env::var_os("MC_MIN_RPC_PORT").is_none() && std::env::var_os("MC_MAX_RPC_PORT").is_none() {
        engine_config.rpc_port_range = STORE_RPC_PORTS;
    }
    engine_config.transfer_timeout = config.transfer_timeout;
    let auto = engine_config.auto_protocols.clone();
    engine_config = engine_config.with_protocols([config.protocol.clone()]);
    if config.same_host_transports {
        engine_config = engine_config.with_auto_protocols(auto);
    }
    if !config.device_name.trim().is_empty() {
        engine_config.backend.options.insert("devices".into(), config.device_name.clone());
    }
    TransferEngine::new(engine_config).map_err(|e| errors::engine("cannot start the engine", &e))
}

/// How the client allocates its segment and staging memory: ordinary pages. (Transparent huge pages cut
/// first-touch faults but, with the kernel's default synchronous defragmentation, made first writes several
/// times slower on a loaded host; hugetlbfs pools are opt-in through the device elsewhere.)
pub(crate) fn memory_options() -> AllocOptions {
    AllocOptions::default()
}

fn mount(master: &Master, client: ClientId, segment: &Segment) -> Result<()> {
    match master.call(&Request::MountSegment { client, segment: segment.clone() })? {
        Response::Done(r) => r.map_err(Error::from),
        other => Err(wrong_kind("mount_segment", &other)),
    }
}

fn ping_loop(weak: Weak<Inner>, control: Arc<PingControl>, interval: Duration) {
    loop {
        {
            let stop = lock(&control.stop);
            let (stop, _) = control.wake.wait_timeout_while(stop, interval, |s| !*s).unwrap_or_else(|p| p.into_inner());
            if *stop {
                return;
            }
        }
        let Some(inner) = weak.upgrade() else { return };
        let timeout = inner.config.rpc_timeout.min(interval.max(Duration::from_millis(500)));
        if let Ok(_open) = inner.op() {
            inner.ping_once(timeout);
        }
        // If the user dropped the last client meanwhile, this drop closes it here (close skips joining us).
    }
}
