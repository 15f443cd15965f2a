//! [`NvmeofTransport`]: routes requests to file segments, cuts them into per-file operations and hands those
//! to the I/O threads (or to cuFile for CUDA memory).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use mooncake_core::{
    Access, BackendConfig, BlockingRequest, BufferDesc, Capabilities, Error, FanIn, LocalRange, MemoryKind,
    MemoryKinds, Opcode, PeerEvents, PerfModel, PieceDone, RegionGuard, RemoteSegment, Result, SegmentDescriptor,
    TransferTask, Transport, TransportContext, sync,
};

use crate::caller;
use crate::cufile::{self, CuWorker};
use crate::io::{self, FileEntry, IoConfig, IoPool, Op};
use crate::segment::{self, FileSpec, PROTOCOL};

/// Settings (engine options or environment variables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeofConfig {
    /// Operations in flight per I/O thread (`queue_depth` / `MC_NVMEOF_QUEUE_DEPTH`, default 32).
    pub queue_depth: usize,
    /// I/O threads, one io_uring each (`io_threads` / `MC_NVMEOF_IO_THREADS`, default 1).
    pub io_threads: usize,
    /// Largest single read or write (`max_io` / `MC_NVMEOF_MAX_IO`, bytes, default 1 MiB, a multiple of 4 KiB);
    /// also the size of each bounce buffer.
    pub max_io: u64,
    /// Open files with O_DIRECT where the file system allows it (`direct` / `MC_NVMEOF_DIRECT`, default 1).
    pub direct: bool,
    /// Most operations handed to the kernel per `io_uring_enter` (`submit_batch` / `MC_NVMEOF_SUBMIT_BATCH`,
    /// default 1: each as soon as it is prepared, as fio does; see docs/nvmeof.md).
    pub submit_batch: usize,
    /// Microseconds an I/O thread that just reported an outcome waits (polling, without sleeping) for the
    /// submitter's next operation before it sleeps (`linger_us` / `MC_NVMEOF_LINGER_US`, default 100; 0: sleep
    /// at once). A submitter keeping a queue depth sends its next request right after it hears of one.
    pub linger_us: u64,
    /// Register the engine's host memory with the rings as io_uring fixed buffers, 1 GiB chunk by chunk as file
    /// I/O first touches them, sparing the kernel a page pinning per operation (`fixed_buffers` /
    /// `MC_NVMEOF_FIXED_BUFFERS`, default 1). Those pages stay pinned while the memory is registered, as RDMA
    /// registration pins them; memory the kernel refuses to pin (a locked-memory limit) is moved as before.
    pub fixed_buffers: bool,
    /// Synchronous calls (`batch_transfer_sync` and friends) submit and reap on the calling thread, with a ring
    /// of its own, when their host memory and alignment need no bounce buffer (`caller_thread` /
    /// `MC_NVMEOF_CALLER_THREAD`, default 1).
    pub caller_thread: bool,
}

impl Default for NvmeofConfig {
    fn default() -> Self {
        NvmeofConfig::from_backend(&BackendConfig::default())
    }
}

impl NvmeofConfig {
    /// Reads options and `MC_NVMEOF_*` environment variables.
    pub fn from_backend(c: &BackendConfig) -> Self {
        let max_io = c.get::<u64>("max_io", "MC_NVMEOF_MAX_IO").unwrap_or(1 << 20).clamp(4096, 64 << 20);
        NvmeofConfig {
            queue_depth: c.get::<usize>("queue_depth", "MC_NVMEOF_QUEUE_DEPTH").unwrap_or(32).clamp(1, 4096),
            io_threads: c.get::<usize>("io_threads", "MC_NVMEOF_IO_THREADS").unwrap_or(1).clamp(1, 16),
            max_io: max_io / io::FILE_ALIGN * io::FILE_ALIGN,
            direct: c.get::<u32>("direct", "MC_NVMEOF_DIRECT") != Some(0),
            submit_batch: c.get::<usize>("submit_batch", "MC_NVMEOF_SUBMIT_BATCH").unwrap_or(1).clamp(1, 4096),
            linger_us: c.get::<u64>("linger_us", "MC_NVMEOF_LINGER_US").unwrap_or(100).min(10_000),
            fixed_buffers: c.get::<u32>("fixed_buffers", "MC_NVMEOF_FIXED_BUFFERS") != Some(0),
            caller_thread: c.get::<u32>("caller_thread", "MC_NVMEOF_CALLER_THREAD") != Some(0),
        }
    }
}

/// What every instance declares.
pub(crate) fn capabilities() -> Capabilities {
    Capabilities {
        read: true,
        write: true,
        notify: false,
        // Host memory in place; GPU memory through cuFile (CUDA, when loaded) or staged through its device.
        memory_kinds: MemoryKinds::of(&[MemoryKind::Host, MemoryKind::Cuda, MemoryKind::Rocm, MemoryKind::Musa]),
        // Nothing serves a file segment: there is no peer whose failure could be reported.
        reports_peer_failure: false,
        requires_local_registration: false,
        cross_process: true,
        same_host_only: false,
        max_request_size: 1 << 40,
        min_request_size: 1,
        optimal_request_size: 1 << 20,
        alignment: 1,
        max_batch_size: 0,
        model: PerfModel {
            bandwidth_bytes_per_sec: 2.0e9,
            latency: Duration::from_micros(80),
            per_request_overhead: Duration::from_micros(2),
        },
    }
}

struct Started {
    io: Arc<IoPool>,
    cu: Option<CuWorker>,
    names: Vec<String>,
    events: Arc<dyn PeerEvents>,
}

/// The files of one segment version, in order.
pub(crate) struct SegFiles {
    seg: Arc<RemoteSegment>,
    pub(crate) files: Vec<Arc<FileEntry>>,
    starts: Vec<u64>,
    total: u64,
}

impl SegFiles {
    /// The operations of a request of `local.len()` bytes at offset `start` of the segment (named `name`):
    /// `(file index, file offset, offset in the request, length)`, per-file slices cut by [`io::cut`]; or the
    /// request's error (past the end, memory no device owns).
    pub(crate) fn pieces(
        &self,
        name: &str,
        local: &LocalRange,
        start: u64,
        max_io: u64,
    ) -> Result<Vec<(usize, u64, u64, u64)>> {
        let len = local.len();
        let end = match start.checked_add(len) {
            Some(end) if len > 0 && end <= self.total => end,
            _ => {
                return Err(Error::AddressNotRegistered {
                    addr: start,
                    len,
                    context: format!(
                        "past the end of file segment {name} ({} bytes in {} files)",
                        self.total,
                        self.files.len()
                    ),
                });
            }
        };
        if matches!(local.access(), Access::Unreachable) {
            return Err(Error::unsupported(
                "moving device memory no linked device owns",
                format!("{PROTOCOL} (register the memory through its device)"),
            ));
        }
        let mut pieces = Vec::new();
        let mut i = self.starts.partition_point(|s| *s <= start).saturating_sub(1);
        let mut cur = start;
        while cur < end && i < self.files.len() {
            let file_start = self.starts[i];
            let file_end = file_start + self.files[i].published;
            let slice_end = end.min(file_end);
            if slice_end > cur {
                let file_off = cur - file_start;
                for (o, n) in io::cut(file_off, slice_end - cur, max_io) {
                    pieces.push((i, file_off + o, cur - start + o, n));
                }
                cur = slice_end;
            }
            i += 1;
        }
        if pieces.is_empty() {
            return Err(Error::InvalidArgument(format!("nvmeof: nothing to move for [{start}, +{len})")));
        }
        Ok(pieces)
    }
}

/// The `nvmeof` transport.
pub struct NvmeofTransport {
    config: NvmeofConfig,
    caps: Capabilities,
    started: OnceLock<Started>,
    segments: RwLock<HashMap<String, Arc<SegFiles>>>,
}

impl std::fmt::Debug for NvmeofTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeofTransport")
            .field("config", &self.config)
            .field("started", &self.started.get().is_some())
            .finish_non_exhaustive()
    }
}

impl NvmeofTransport {
    /// A transport with these settings (not started).
    pub fn new(config: NvmeofConfig) -> Self {
        NvmeofTransport {
            config,
            caps: capabilities(),
            started: OnceLock::new(),
            segments: RwLock::new(HashMap::new()),
        }
    }

    /// The settings in use.
    pub fn config(&self) -> &NvmeofConfig {
        &self.config
    }

    fn names(&self) -> Vec<String> {
        self.started.get().map_or_else(|| segment::local_names(""), |s| s.names.clone())
    }

    /// Whether `target` is the segment version whose files are cached (every file resolved to a path): routing
    /// asks for every request, so this spares re-reading the descriptor's fields.
    fn cached(&self, target: &RemoteSegment) -> bool {
        sync::read(&self.segments).get(&target.name).is_some_and(|s| std::ptr::eq(Arc::as_ptr(&s.seg), target))
    }

    /// The files of `target` as this host resolves them, reusing open files of an earlier version of its
    /// descriptor when a file keeps its path and length.
    fn files_for(&self, st: &Started, target: &Arc<RemoteSegment>) -> Result<Arc<SegFiles>> {
        let old = sync::read(&self.segments).get(&target.name).cloned();
        if let Some(s) = &old {
            if Arc::ptr_eq(&s.seg, target) {
                return Ok(s.clone());
            }
        }
        let specs = segment::files_of(&target.descriptor)?;
        let mut files = Vec::with_capacity(specs.len());
        let mut starts = Vec::with_capacity(specs.len());
        let mut total = 0u64;
        for spec in &specs {
            let path = PathBuf::from(spec.resolve(&st.names));
            if path.as_os_str().is_empty() {
                return Err(Error::unavailable(format!(
                    "segment {:?}: a file has no path on this host (empty file_path, no local_path_map entry for {:?})",
                    target.name, st.names
                )));
            }
            let reuse = old
                .as_ref()
                .and_then(|o| o.files.iter().find(|f| f.path == path && f.published == spec.length).cloned());
            files.push(reuse.unwrap_or_else(|| {
                Arc::new(FileEntry::new(
                    path,
                    spec.length,
                    self.config.direct,
                    Some((st.events.clone(), target.name.clone())),
                ))
            }));
            starts.push(total);
            total = total.checked_add(spec.length).ok_or_else(|| {
                Error::MalformedJson(format!("segment {:?}: the files' lengths overflow", target.name))
            })?;
        }
        let s = Arc::new(SegFiles { seg: target.clone(), files, starts, total });
        sync::write(&self.segments).insert(target.name.clone(), s.clone());
        Ok(s)
    }
}

fn resolvable(spec: &FileSpec, names: &[String]) -> bool {
    !spec.resolve(names).is_empty()
}

#[async_trait]
impl Transport for NvmeofTransport {
    fn name(&self) -> &str {
        PROTOCOL
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn start(&self, ctx: &TransportContext) -> Result<()> {
        let io = Arc::new(IoPool::start(IoConfig {
            queue_depth: self.config.queue_depth,
            max_io: self.config.max_io,
            threads: self.config.io_threads,
            submit_batch: self.config.submit_batch,
            linger: Duration::from_micros(self.config.linger_us),
            fixed_buffers: self.config.fixed_buffers,
        })?);
        let cu = match cufile::get() {
            Ok(cf) => Some(CuWorker::start(cf, io.clone()).map_err(|e| Error::unavailable(format!("nvmeof: {e}")))?),
            Err(why) => {
                tracing::debug!(%why, "nvmeof: cuFile not used");
                None
            }
        };
        let st = Started { io, cu, names: segment::local_names(&ctx.local_name), events: ctx.peer_events.clone() };
        if let Err(again) = self.started.set(st) {
            again.io.stop();
            return Err(Error::InvalidArgument("nvmeof transport started twice".into()));
        }
        Ok(())
    }

    fn register_memory(&self, region: &RegionGuard, _desc: &mut BufferDesc) -> Result<()> {
        if let Some(st) = self.started.get() {
            st.io.register_region(region);
        }
        Ok(())
    }

    fn unregister_memory(&self, region: &RegionGuard) -> Result<()> {
        if let Some(st) = self.started.get() {
            st.io.unregister_region(region.addr);
        }
        Ok(())
    }

    fn describe(&self, _desc: &mut SegmentDescriptor) {
        // File segments are published on their own (`register_file_segment`); an engine publishes no files.
    }

    /// A file segment whose every file has a path on this host (its `local_path_map` entry, or `file_path`).
    fn can_reach(&self, target: &RemoteSegment) -> bool {
        if self.cached(target) {
            return true;
        }
        let names = self.names();
        segment::files_of(&target.descriptor).is_ok_and(|f| !f.is_empty() && f.iter().all(|s| resolvable(s, &names)))
    }

    fn can_reach_buffer(&self, target: &RemoteSegment, buffer: &BufferDesc) -> bool {
        if self.cached(target) {
            return true;
        }
        let names = self.names();
        matches!(FileSpec::from_buffer(buffer), Ok(Some(f)) if resolvable(&f, &names))
    }

    fn submit(&self, target: &Arc<RemoteSegment>, tasks: Vec<TransferTask>) {
        let Some(st) = self.started.get() else {
            TransferTask::fail_all(tasks, &Error::NotInitialized("nvmeof transport not started".into()));
            return;
        };
        let seg = match self.files_for(st, target) {
            Ok(s) => s,
            Err(e) => return TransferTask::fail_all(tasks, &e),
        };
        let mut ops = Vec::with_capacity(tasks.len());
        let mut touched: HashSet<*const FileEntry> = HashSet::new();
        for t in tasks {
            let len = t.length();
            let pieces = match seg.pieces(&target.name, &t.local, t.remote_addr, self.config.max_io) {
                Ok(p) => p,
                Err(e) => {
                    t.completion.finish(Err(e));
                    continue;
                }
            };
            let mut dones: Vec<PieceDone> = if pieces.len() == 1 {
                vec![PieceDone::Whole(t.completion)]
            } else {
                let fan = Arc::new(FanIn::new(pieces.len(), len, t.completion));
                (0..pieces.len()).map(|_| PieceDone::Part(fan.clone())).collect()
            };
            for ((i, file_off, local_off, n), done) in pieces.into_iter().zip(dones.drain(..)) {
                let Some(local) = t.local.sub(local_off, n) else {
                    done.finish(Err(Error::InvalidArgument("nvmeof: a slice outside its request".into())));
                    continue;
                };
                let file = seg.files[i].clone();
                if touched.insert(Arc::as_ptr(&file)) {
                    // A file removed since it was opened is opened again by path: writes never land in it.
                    file.forget_if_unlinked();
                }
                let op = Op { file, file_off, opcode: t.opcode, local, done: Some(done) };
                match &st.cu {
                    Some(cu) if io::is_cuda(&op.local) => {
                        if let Some(op) = cu.push(op) {
                            ops.push(op);
                        }
                    }
                    _ => ops.push(op),
                }
            }
        }
        st.io.push(ops);
    }

    /// Small synchronous calls run on the calling thread ([`caller`](crate::caller)): no hand-off to the I/O
    /// thread and back. `None` (the queued path) for what needs a bounce buffer or a device's copies.
    fn transfer_blocking(
        &self,
        target: &Arc<RemoteSegment>,
        opcode: Opcode,
        local: &LocalRange,
        remote_addr: u64,
        timeout: Duration,
    ) -> Option<Result<u64>> {
        let one = [BlockingRequest { local: local.clone(), remote_addr }];
        self.transfer_blocking_batch(target, opcode, &one, timeout).and_then(|mut v| v.pop())
    }

    fn transfer_blocking_batch(
        &self,
        target: &Arc<RemoteSegment>,
        opcode: Opcode,
        requests: &[BlockingRequest],
        _timeout: Duration,
    ) -> Option<Vec<Result<u64>>> {
        if !self.config.caller_thread {
            return None;
        }
        let st = self.started.get()?;
        let seg = self.files_for(st, target).ok()?;
        caller::run(&seg, &target.name, opcode, requests, self.config.max_io, self.config.submit_batch)
    }

    fn forget_peer(&self, segment_name: &str) {
        sync::write(&self.segments).remove(segment_name);
    }

    async fn shutdown(&self) {
        if let Some(st) = self.started.get() {
            st.io.stop();
            if let Some(cu) = &st.cu {
                cu.stop();
            }
        }
        sync::write(&self.segments).clear();
    }
}

impl Drop for NvmeofTransport {
    fn drop(&mut self) {
        if let Some(st) = self.started.get() {
            st.io.stop();
        }
    }
}
