//! [`GpuIpcTransport`]: one transport implementation for nvlink, hip and musa.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use mooncake_core::{
    Access, Allocation, BackendConfig, BufferDesc, Capabilities, Error, LocalRange, MemoryDevice, MemoryKind,
    MemoryKinds, Opcode, PerfModel, RegionGuard, RemoteSegment, Result, SegmentDescriptor, SharingHandle, TransferTask,
    Transport, TransportContext, sync,
};
use mooncake_raw::Span;

use crate::flavor::Flavor;
use crate::imports::Imports;
use crate::section::{FIELD_HANDLE, IpcBuffer, IpcHost, encode_fd_handle};
use crate::sys;

/// Largest request run on the caller's thread by [`Transport::transfer_blocking`]; larger ones go to the copy
/// workers so that several run at once.
const CALLER_THREAD_MAX: u64 = 4 << 20;

/// One request for a copy worker.
struct Job {
    shared: Arc<Shared>,
    target: Arc<RemoteSegment>,
    task: TransferTask,
}

impl Job {
    fn run(self) {
        if self.task.completion.is_final() {
            return; // canceled or timed out meanwhile
        }
        let result = self.shared.run(&self.target, self.task.opcode, &self.task.local, self.task.remote_addr);
        self.task.completion.finish(result);
    }
}

/// A GPU-to-GPU transport within a node over the vendor's IPC handles (see the crate docs).
pub struct GpuIpcTransport {
    shared: Arc<Shared>,
}

struct Shared {
    flavor: &'static Flavor,
    caps: Capabilities,
    workers: usize,
    started: OnceLock<Started>,
    /// Handles published for our registered buffers, by region start; the region guard keeps the memory
    /// registered (and an fd handle's descriptor open) while peers may map it.
    exports: Mutex<BTreeMap<u64, Export>>,
    imports: Imports,
    queue: Mutex<Option<mpsc::Sender<Job>>>,
}

struct Started {
    device: Arc<dyn MemoryDevice>,
    host_id: Option<String>,
}

struct Export {
    _region: RegionGuard,
    _handle: SharingHandle,
}

impl GpuIpcTransport {
    /// A transport of `flavor` configured by `config` (option `workers`, else the flavor's variable).
    pub fn new(flavor: &'static Flavor, config: &BackendConfig) -> Self {
        let caps = Capabilities {
            read: true,
            write: true,
            notify: false,
            memory_kinds: MemoryKinds::of(&[MemoryKind::Host, flavor.kind]),
            reports_peer_failure: true,
            // Only registered memory is known to be device memory; an unregistered range would be taken for
            // host memory.
            requires_local_registration: true,
            cross_process: true,
            same_host_only: true,
            optimal_request_size: 4 << 20,
            model: PerfModel {
                bandwidth_bytes_per_sec: 100e9,
                latency: Duration::from_micros(8),
                per_request_overhead: Duration::from_micros(2),
            },
            ..Capabilities::default()
        };
        let shared = Shared {
            flavor,
            caps,
            workers: flavor.workers(config),
            started: OnceLock::new(),
            exports: Mutex::new(BTreeMap::new()),
            imports: Imports::default(),
            queue: Mutex::new(None),
        };
        GpuIpcTransport { shared: Arc::new(shared) }
    }

    /// The flavor (protocol, memory kind, handle kinds).
    pub fn flavor(&self) -> &'static Flavor {
        self.shared.flavor
    }

    /// Number of peer buffers mapped into this process right now.
    #[cfg(test)]
    pub(crate) fn mapped(&self) -> usize {
        self.shared.imports.len()
    }
}

impl Shared {
    fn started(&self) -> Result<&Started> {
        self.started
            .get()
            .ok_or_else(|| Error::NotInitialized(format!("{} transport not started", self.flavor.protocol)))
    }

    /// Moves one request's bytes between `local` and the peer buffer mapped for `remote_addr`.
    fn run(&self, target: &RemoteSegment, opcode: Opcode, local: &LocalRange, remote_addr: u64) -> Result<u64> {
        let st = self.started()?;
        let len = local.len();
        let buffer = target.descriptor.find_buffer(remote_addr, len).ok_or_else(|| Error::AddressNotRegistered {
            addr: remote_addr,
            len,
            context: format!("not inside any buffer of segment {}", target.name),
        })?;
        let ipc = buffer.section::<IpcBuffer>().map_err(|e| e.in_segment(&target.name))?.ok_or_else(|| {
            Error::AddressNotRegistered {
                addr: remote_addr,
                len,
                context: format!(
                    "buffer {:#x} ({}) of segment {} has no {} handle (host memory, or another vendor's)",
                    buffer.addr, buffer.name, target.name, self.flavor.protocol
                ),
            }
        })?;
        if self.same_process(target) {
            // Our own memory (another engine of this program): no handle to open, the address is valid here.
            let remote = st.device.allocation_of(remote_addr, len).ok_or_else(|| Error::AddressNotRegistered {
                addr: remote_addr,
                len,
                context: format!(
                    "segment {} (this process): no {} memory there any more",
                    target.name,
                    st.device.name()
                ),
            })?;
            copy(&st.device, &remote, remote_addr - remote.addr, local, opcode)?;
            return Ok(len);
        }
        let mapping = self.imports.get(self.flavor, &st.device, &target.name, buffer, &ipc)?;
        let remote_offset = ipc.offset + (remote_addr - buffer.addr);
        copy(&st.device, &mapping.allocation, remote_offset, local, opcode)?;
        Ok(len)
    }

    /// Whether `target` is an engine of this very process (same host identity and pid).
    fn same_process(&self, target: &RemoteSegment) -> bool {
        let ours = self.started.get().and_then(|s| s.host_id.as_deref());
        match target.descriptor.section::<IpcHost>() {
            Ok(Some(IpcHost { host_id, pid: Some(pid) })) => {
                Some(host_id.as_str()) == ours && pid == std::process::id()
            }
            _ => false,
        }
    }
}

/// One copy between local memory and a mapped peer allocation: device to device when the local side is
/// memory of the same device, else through the device's host copies (host memory in place, other device
/// memory staged by `mooncake-raw`).
fn copy(
    device: &Arc<dyn MemoryDevice>,
    remote: &Allocation,
    remote_offset: u64,
    local: &LocalRange,
    opcode: Opcode,
) -> Result<()> {
    let len = local.len();
    if let Access::Device(d) = local.access()
        && same_driver(&d.device, device)
    {
        // Another instance of the driver made the local allocation: ask ours for the allocation as the driver
        // sees it (GPU drivers know every allocation of the process).
        let mine = std::ptr::addr_eq(Arc::as_ptr(&d.device), Arc::as_ptr(device));
        let local_alloc = match mine {
            true => d.allocation.clone(),
            false => device.allocation_of(local.addr(), len).unwrap_or_else(|| d.allocation.clone()),
        };
        let local_offset = local.addr() - local_alloc.addr;
        return match opcode {
            Opcode::Write => device.copy_between(&local_alloc, local_offset, remote, remote_offset, len),
            Opcode::Read => device.copy_between(remote, remote_offset, &local_alloc, local_offset, len),
        };
    }
    let mut span = Span::local(local)?;
    match opcode {
        Opcode::Write => device.copy_from_host(&span.bytes()?, remote, remote_offset),
        Opcode::Read => {
            let mut sink = span.sink();
            device.copy_to_host(remote, remote_offset, sink.bytes())?;
            sink.commit()
        }
    }
}

/// Whether two device instances are the same driver: GPU drivers keep their allocations per process, so any
/// instance copies between allocations another made or imported.
fn same_driver(a: &Arc<dyn MemoryDevice>, b: &Arc<dyn MemoryDevice>) -> bool {
    a.kind() == b.kind() && a.name() == b.name()
}

fn start_workers(shared: &Arc<Shared>) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..shared.workers {
        let rx = rx.clone();
        let name = format!("{}-copy-{i}", shared.flavor.protocol);
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            loop {
                let job = sync::lock(&rx).recv();
                match job {
                    Ok(job) => job.run(),
                    Err(_) => return,
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a GPU IPC copy worker");
        }
    }
    tx
}

#[async_trait]
impl Transport for GpuIpcTransport {
    fn name(&self) -> &str {
        self.shared.flavor.protocol
    }

    fn capabilities(&self) -> &Capabilities {
        &self.shared.caps
    }

    async fn start(&self, ctx: &TransportContext) -> Result<()> {
        let flavor = self.shared.flavor;
        let device = ctx.devices.iter().find(|d| d.kind() == flavor.kind).cloned().ok_or_else(|| {
            Error::unavailable(format!(
                "the {} transport needs a {} memory device and this engine has none (linked and usable: {:?})",
                flavor.protocol,
                flavor.vendor,
                ctx.devices.iter().map(|d| d.name().to_string()).collect::<Vec<_>>()
            ))
        })?;
        let host_id = match sys::boot_id() {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::warn!(error = %e, "GPU IPC: no host identity; peers of ours will not know we share a host");
                None
            }
        };
        if self.shared.started.set(Started { device, host_id }).is_err() {
            return Err(Error::InvalidArgument(format!("{} transport started twice", flavor.protocol)));
        }
        *sync::lock(&self.shared.queue) = Some(start_workers(&self.shared));
        Ok(())
    }

    fn register_memory(&self, region: &RegionGuard, desc: &mut BufferDesc) -> Result<()> {
        let Access::Device(d) = region.access() else { return Ok(()) };
        let Some(st) = self.shared.started.get() else { return Ok(()) };
        if !same_driver(&d.device, &st.device) {
            return Ok(());
        }
        let handle = match d.device.export_handle(&d.allocation) {
            Ok(h) => h,
            Err(e) => {
                // Peers then reach this buffer through another transport (staged over tcp, or rdma).
                tracing::warn!(protocol = self.shared.flavor.protocol, addr = region.addr, error = %e,
                    "cannot export an IPC handle; the buffer is not published for GPU IPC");
                return Ok(());
            }
        };
        let bytes = match (&handle.fd, Some(handle.kind.as_str()) == self.shared.flavor.fd_handle) {
            (Some(fd), true) => {
                use std::os::fd::AsRawFd;
                encode_fd_handle(fd.as_raw_fd(), std::process::id() as i32)
            }
            (None, false) if self.shared.flavor.knows(&handle.kind) => handle.data.clone(),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "device {} exported a {:?} handle, which the {} transport cannot publish",
                    d.device.name(),
                    handle.kind,
                    self.shared.flavor.protocol
                )));
            }
        };
        desc.set_section(&IpcBuffer {
            handle: bytes,
            kind: Some(handle.kind.clone()),
            offset: region.addr - d.allocation.addr,
            alloc_length: Some(d.allocation.len),
        });
        sync::lock(&self.shared.exports).insert(region.addr, Export { _region: region.clone(), _handle: handle });
        Ok(())
    }

    fn unregister_memory(&self, region: &RegionGuard) -> Result<()> {
        sync::lock(&self.shared.exports).remove(&region.addr);
        Ok(())
    }

    fn describe(&self, desc: &mut SegmentDescriptor) {
        if let Some(host_id) = self.shared.started.get().and_then(|s| s.host_id.clone()) {
            desc.set_section(&IpcHost { host_id, pid: Some(std::process::id()) });
        }
    }

    fn can_reach(&self, target: &RemoteSegment) -> bool {
        let ours = self.shared.started.get().and_then(|s| s.host_id.as_deref());
        match (target.descriptor.section::<IpcHost>(), ours) {
            (Ok(Some(theirs)), Some(ours)) => theirs.host_id == ours,
            // Upstream peers publish no host identity: trust the protocol they chose, as upstream does.
            (Ok(None), _) => true,
            _ => false,
        }
    }

    fn can_reach_buffer(&self, _target: &RemoteSegment, buffer: &BufferDesc) -> bool {
        buffer.fields.get(FIELD_HANDLE).and_then(|v| v.as_str()).is_some_and(|s| !s.is_empty())
    }

    fn submit(&self, target: &Arc<RemoteSegment>, tasks: Vec<TransferTask>) {
        let queue = sync::lock(&self.shared.queue).clone();
        let Some(queue) = queue else {
            let e =
                Error::NotInitialized(format!("{} transport not started or shut down", self.shared.flavor.protocol));
            TransferTask::fail_all(tasks, &e);
            return;
        };
        for task in tasks {
            let job = Job { shared: self.shared.clone(), target: target.clone(), task };
            if let Err(mpsc::SendError(job)) = queue.send(job) {
                let e = Error::unavailable(format!("{}: no copy worker is running", self.shared.flavor.protocol));
                job.task.completion.finish(Err(e));
            }
        }
    }

    fn transfer_blocking(
        &self,
        target: &Arc<RemoteSegment>,
        opcode: Opcode,
        local: &LocalRange,
        remote_addr: u64,
        _timeout: Duration,
    ) -> Option<Result<u64>> {
        (local.len() <= CALLER_THREAD_MAX).then(|| self.shared.run(target, opcode, local, remote_addr))
    }

    fn forget_peer(&self, segment_name: &str) {
        self.shared.imports.forget(segment_name);
    }

    async fn shutdown(&self) {
        sync::lock(&self.shared.queue).take();
        self.shared.imports.clear();
        sync::lock(&self.shared.exports).clear();
    }
}
