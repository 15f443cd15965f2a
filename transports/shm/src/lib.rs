//! Same-host transport of mooncake-rs (protocol `"shm"`): one copy from the initiator's memory to
//! the target's (or back) by cross-memory attach, `process_vm_readv` / `process_vm_writev`, with no
//! network stack and no staging buffer. The kernel copies directly between the two address
//! spaces, so a transfer costs one `memcpy`'s worth of memory traffic.
//!
//! # How a transfer works
//! - **Publication.** A target publishes in its segment descriptor its pid, its start time
//!   (`/proc/<pid>/stat` field 22), a host identity `shm_host_id` = `<boot_id>:<pid namespace
//!   inode>`, and where to find its *registration table* (a descriptor number and a random token);
//!   each registered buffer carries its table `shm_slot` and `shm_seq`. See [`peer`] for the field
//!   names.
//! - **Routing.** [`ShmTransport::can_reach`] is true only for targets whose host identity equals
//!   ours: same kernel boot and same pid namespace, so a pid means the same process on both sides
//!   and containers are not confused. The declared cost model (about 10 GB/s, 2 us) makes the
//!   engine prefer shm over tcp whenever a same-host target offers both.
//! - **Connection.** The initiator opens `/proc/<pid>`, checks the start time (a pid reused by
//!   another process is refused), opens a pidfd (exit notification), checks the start time again,
//!   and maps the target's table read-write from `/proc/<pid>/fd/<n>`, verifying its seals, size
//!   and token.
//! - **Copy.** Every request is checked on the initiator: the remote range must lie inside one
//!   buffer of the descriptor (zero length, overflow and out-of-bounds ranges are
//!   `AddressNotRegistered` / `InvalidArgument`), the local range inside a registered region of
//!   this engine (the region guard is held during the copy), and the target must still be alive.
//!   Local memory of a device the CPU cannot read (GPU memory) is staged: the device copies it into a host
//!   buffer that the kernel copies from (or the other way round), through `mooncake-raw`.
//!   Copies run on dedicated threads, never on the async runtime; consecutive small requests share
//!   one system call (up to `IOV_MAX` iovecs), large ones are striped over the threads and cut into
//!   calls of at most 4 MiB; short transfers resume where the kernel stopped. A single small
//!   blocking request runs on the caller's thread ([`Transport::transfer_blocking`]).
//!
//! # Stale descriptors: the registration table
//! One-sided copies give the target no chance to check an access, and an initiator may hold a
//! descriptor listing a buffer the target has since unregistered (and perhaps freed). Re-reading
//! the descriptor before every batch would cost a round trip and still race with unregistration.
//! Instead each target exports a small sealed memfd, the registration table, that initiators map:
//! one 64-byte slot per registered buffer with a sequence number (odd = live) and an in-flight
//! counter. Before each copy the initiator increments the slot's counter, then checks that the
//! slot still holds the sequence number its descriptor names and that the table is not closed;
//! after the copy it decrements the counter. Unregistering first changes the sequence number, then
//! waits until the counter drops to zero. With sequentially consistent atomics on both sides,
//! either the initiator sees the change and refuses the request (`AddressNotRegistered`, and the
//! engine is told to re-read the descriptor), or the target waits until the copy is done: once
//! `unregister_memory` returns `Ok`, no peer touches that memory again. Reading the target's
//! registration list through `process_vm_readv` instead would cost a system call per check and
//! still leave the window between check and copy open. Shutting the transport down closes the
//! table (initiators then get `RemoteDisconnected`). A target that dies is noticed through its
//! pidfd before each job and by `ESRCH` from the copy itself: `RemoteDisconnected`, reported
//! through [`PeerEvents::peer_failed`].
//!
//! Limits of the scheme: an initiator that dies in the middle of a copy leaves its count behind;
//! the target's unregistration then waits `unregister_wait` (a dead process copies nothing more),
//! returns `Timeout` and retires the slot. A target that calls `exec` without shutting its engine
//! down is not detected (its pid and start time stay the same). Initiators need write access to the
//! table for the counters; a hostile process of the same user could corrupt it, but such a process
//! can already write into the target through ptrace.
//!
//! # Permissions
//! Cross-memory attach needs ptrace access to the target (same user and a dumpable target, or
//! `CAP_SYS_PTRACE`). [`ShmTransport::start`] calls `prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY)` so
//! that Yama `ptrace_scope=1` hosts let peers of the same user attach. A refused attach is an
//! `Unavailable` error saying what is missing. Memory registered at a device location (`cuda:0`,
//! ...) is not published for shm: the kernel cannot copy device memory.
//!
//! Settings (engine options or environment): `workers` / `MC_SHM_WORKERS` (copy threads, default
//! min(4, cores)), `stripe_min` / `MC_SHM_STRIPE_MIN` (requests of at least twice this are striped
//! over the threads; default 1 MiB), `direct` / `MC_SHM_DIRECT` (0 disables the caller-thread
//! path), `max_buffers` / `MC_SHM_MAX_BUFFERS` (table slots, default 16384),
//! `unregister_wait_ms` / `MC_SHM_UNREGISTER_WAIT_MS` (default 30000), `worker_spin_us` /
//! `MC_SHM_WORKER_SPIN_US` (how long an idle copy thread polls before sleeping, default 20).
//!
//! ```no_run
//! // Link it (the `mooncake` facade does this for its `shm` feature) and list it with tcp: the
//! // engine picks shm for peers on this host and tcp for the others.
//! mooncake_transport_shm::link();
//! let config = mooncake_core::EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols(["shm", "tcp"]);
//! ```

mod copy;
mod identity;
pub mod peer;
mod sys;
mod table;
mod worker;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use mooncake_core::registry::{Availability, TransportFactory};
use mooncake_core::{
    Access, BackendConfig, BufferDesc, Capabilities, Error, FanIn, LocalRange, MemoryKind, MemoryKinds, Opcode,
    PeerEvents, PerfModel, PieceDone, RegionGuard, RegionTable, RemoteSegment, Result, SegmentDescriptor, StripePlan,
    StripeRounding, TransferTask, Transport, TransportContext, sync,
};
use mooncake_raw::Span;

use copy::{Copier, Range, Stop};
use peer::{BufIndex, Conn, PeerInfo};
use table::OwnerTable;
use worker::{Item, Job, Pool};

/// Protocol name.
pub const NAME: &str = "shm";

/// Small requests are packed into jobs of at most this many bytes...
const JOB_BYTES: u64 = 1 << 20;
/// ...and this many requests (one job runs on one thread).
const JOB_ITEMS: usize = 256;
/// How long shutdown waits for peers' copies into our memory to finish.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Tunables of the shm transport.
#[derive(Debug, Clone, PartialEq)]
pub struct ShmConfig {
    /// Copy threads.
    pub workers: usize,
    /// Requests of at least twice this size are striped over the copy threads.
    pub stripe_min: u64,
    /// Run single blocking requests that would not be striped on the calling thread.
    pub direct: bool,
    /// Slots of the registration table: the most buffers registered at once.
    pub max_buffers: u32,
    /// How long unregistering waits for peers still copying.
    pub unregister_wait: Duration,
    /// How long an idle copy thread polls for work before sleeping.
    pub worker_spin: Duration,
}

impl Default for ShmConfig {
    fn default() -> Self {
        ShmConfig::from_backend(&BackendConfig::default())
    }
}

impl ShmConfig {
    /// Reads options and `MC_SHM_*` environment variables.
    pub fn from_backend(config: &BackendConfig) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        ShmConfig {
            workers: config.get::<usize>("workers", "MC_SHM_WORKERS").unwrap_or(cores.min(4)).clamp(1, 64),
            stripe_min: config.get::<u64>("stripe_min", "MC_SHM_STRIPE_MIN").unwrap_or(1 << 20).max(64 << 10),
            direct: config.get::<u32>("direct", "MC_SHM_DIRECT") != Some(0),
            max_buffers: config
                .get::<u32>("max_buffers", "MC_SHM_MAX_BUFFERS")
                .unwrap_or(16384)
                .clamp(1, table::MAX_SLOTS),
            unregister_wait: Duration::from_millis(
                config.get::<u64>("unregister_wait_ms", "MC_SHM_UNREGISTER_WAIT_MS").unwrap_or(30_000),
            ),
            worker_spin: Duration::from_micros(
                config.get::<u64>("worker_spin_us", "MC_SHM_WORKER_SPIN_US").unwrap_or(20).min(10_000),
            ),
        }
    }

    /// How a request of `len` bytes is cut over the copy threads.
    fn plan(&self, len: u64) -> StripePlan {
        StripePlan::new(len, self.workers, self.stripe_min, StripeRounding::Down)
    }
}

/// The capabilities every shm instance declares.
fn capabilities() -> Capabilities {
    Capabilities {
        read: true,
        write: true,
        notify: false,
        // Local GPU memory is staged through its device; a peer's GPU memory is not published for shm (the
        // kernel cannot copy into it), see `can_reach_buffer`.
        memory_kinds: MemoryKinds::of(&[MemoryKind::Host, MemoryKind::Cuda, MemoryKind::Rocm, MemoryKind::Musa]),
        reports_peer_failure: true,
        requires_local_registration: true,
        cross_process: true,
        same_host_only: true,
        max_request_size: 1 << 40,
        min_request_size: 1,
        optimal_request_size: 1 << 20,
        alignment: 1,
        max_batch_size: 0,
        model: PerfModel {
            bandwidth_bytes_per_sec: 10.0e9,
            latency: Duration::from_micros(2),
            per_request_overhead: Duration::from_nanos(300),
        },
    }
}

struct Started {
    table: OwnerTable,
    pool: Pool,
    regions: Arc<RegionTable>,
    /// Regions published in the table, kept registered until their slots are retired.
    held: std::sync::Mutex<HashMap<u64, RegionGuard>>,
    events: Arc<dyn PeerEvents>,
    info: PeerInfo,
}

/// What the initiator knows about one target segment.
#[derive(Debug)]
struct PeerEntry {
    /// The segment version this entry was built from.
    seg: Arc<RemoteSegment>,
    info: PeerInfo,
    conn: Arc<Conn>,
    index: BufIndex,
}

/// The shm transport.
pub struct ShmTransport {
    config: ShmConfig,
    caps: Capabilities,
    started: OnceLock<Started>,
    peers: RwLock<HashMap<String, Arc<PeerEntry>>>,
}

impl std::fmt::Debug for ShmTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmTransport")
            .field("config", &self.config)
            .field("started", &self.started.get().is_some())
            .finish_non_exhaustive()
    }
}

thread_local! {
    /// iovec buffers of the caller-thread path.
    static DIRECT_COPIER: std::cell::RefCell<Copier> = std::cell::RefCell::new(Copier::default());
}

impl ShmTransport {
    /// A transport with the given settings (not started).
    pub fn new(config: ShmConfig) -> Self {
        ShmTransport { config, caps: capabilities(), started: OnceLock::new(), peers: RwLock::new(HashMap::new()) }
    }

    /// The settings in use.
    pub fn config(&self) -> &ShmConfig {
        &self.config
    }

    /// The connection state for `target`, reusing the mapped table while the descriptor names the
    /// same process and table.
    fn peer_for(&self, target: &Arc<RemoteSegment>) -> Result<Arc<PeerEntry>> {
        if let Some(e) = sync::read(&self.peers).get(&target.name) {
            if Arc::ptr_eq(&e.seg, target) && !e.conn.is_dead() {
                return Ok(e.clone());
            }
        }
        let info = PeerInfo::from_descriptor(&target.name, &target.descriptor)?;
        let mut peers = sync::write(&self.peers);
        let conn = match peers.get(&target.name) {
            Some(e) if Arc::ptr_eq(&e.seg, target) && !e.conn.is_dead() => return Ok(e.clone()),
            Some(e) if e.info == info && !e.conn.is_dead() => e.conn.clone(),
            _ => Arc::new(Conn::open(&target.name, &info)?),
        };
        let entry = Arc::new(PeerEntry {
            seg: target.clone(),
            info,
            conn,
            index: BufIndex::from_descriptor(&target.descriptor),
        });
        peers.insert(target.name.clone(), entry.clone());
        Ok(entry)
    }

    /// The connection to `target`, reporting a failed peer to the engine.
    fn peer_or_report(&self, st: &Started, target: &Arc<RemoteSegment>) -> Result<Arc<PeerEntry>> {
        self.peer_for(target).inspect_err(|e| {
            if e.is_disconnect() {
                st.events.peer_failed(&target.name);
            }
        })
    }

    /// Runs one request on the calling thread (host memory: device memory is staged by the copy threads).
    fn copy_here(
        &self,
        st: &Started,
        target: &Arc<RemoteSegment>,
        op: Opcode,
        local: &LocalRange,
        remote: u64,
        timeout: Duration,
    ) -> Result<u64> {
        let len = local.len();
        let peer = self.peer_or_report(st, target)?;
        let buf = *peer.index.find(remote, len).ok_or_else(|| remote_range_error(&target.name, remote, len))?;
        let conn = &peer.conn;
        conn.check_alive().inspect_err(|_| st.events.peer_failed(&target.name))?;
        // The kernel copies into and out of this process at the local address: it must be registered host
        // memory, held until the copy is done.
        let _guard = local.registered_in(&st.regions, worker::LOCAL_CONTEXT)?;
        let span = Span::local(local)?;
        let addr =
            span.host_addr().ok_or_else(|| Error::unsupported("the caller-thread copy of device memory", NAME))?;
        let range = Range { local: addr, remote, len };
        let _lease = conn.table.acquire(&buf).map_err(|r| {
            st.events.peer_failed(&target.name);
            conn.refusal(r, remote, len)
        })?;
        let deadline = Instant::now().checked_add(timeout);
        let r = DIRECT_COPIER.with(|c| c.borrow_mut().run(conn.pid, op, &[range], deadline, |_| {}));
        match r {
            Ok(()) => Ok(len),
            Err(Stop::Deadline { .. }) => Err(Error::Timeout(timeout)),
            Err(Stop::Os { error, .. }) => {
                let e = conn.os_error(&error, op, remote, len);
                if e.is_disconnect() {
                    st.events.peer_failed(&target.name);
                }
                Err(e)
            }
        }
    }
}

/// The error for a remote range that no published buffer contains.
fn remote_range_error(segment: &str, addr: u64, len: u64) -> Error {
    if len == 0 {
        Error::InvalidArgument("zero-length request".into())
    } else if addr.checked_add(len).is_none() {
        Error::InvalidArgument(format!("remote address {addr:#x} + length {len} overflows"))
    } else {
        Error::AddressNotRegistered {
            addr,
            len,
            context: format!("not inside any buffer segment {segment} publishes for shm"),
        }
    }
}

#[async_trait]
impl Transport for ShmTransport {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn start(&self, ctx: &TransportContext) -> Result<()> {
        let me = identity::local()?;
        if let Err(e) = sys::allow_any_tracer() {
            tracing::warn!(error = %e, "shm: prctl(PR_SET_PTRACER_ANY) failed; peers may be refused under Yama");
        }
        let table = OwnerTable::create(self.config.max_buffers)?;
        let info = PeerInfo::local(me, table.fd_number(), table.slots(), table.token());
        let pool =
            Pool::spawn(self.config.workers, self.config.worker_spin, ctx.regions.clone(), ctx.peer_events.clone())?;
        let started = Started {
            table,
            pool,
            regions: ctx.regions.clone(),
            held: std::sync::Mutex::new(HashMap::new()),
            events: ctx.peer_events.clone(),
            info,
        };
        if let Err(again) = self.started.set(started) {
            again.pool.stop();
            return Err(Error::InvalidArgument("shm transport started twice".into()));
        }
        tracing::debug!(pid = me.pid, host = %me.host_id, workers = self.config.workers, "shm transport started");
        Ok(())
    }

    fn register_memory(&self, region: &RegionGuard, desc: &mut BufferDesc) -> Result<()> {
        let st = self.started.get().ok_or_else(|| Error::NotInitialized("shm transport not started".into()))?;
        if !region.is_host() {
            // Device memory cannot be copied by the kernel: not published for shm (peers reach it over
            // another transport; our own device memory is staged on the initiating side).
            return Ok(());
        }
        let b = st.table.register(region.addr, region.len)?;
        peer::write_buffer(&b, desc);
        // Peers copy into the memory through the published table: keep the region registered until
        // unregister_memory retires the slot.
        sync::lock(&st.held).insert(region.addr, region.clone());
        Ok(())
    }

    fn unregister_memory(&self, region: &RegionGuard) -> Result<()> {
        match self.started.get() {
            Some(st) => {
                let r = st.table.unregister(region.addr, self.config.unregister_wait);
                if r.is_ok() {
                    sync::lock(&st.held).remove(&region.addr);
                }
                r
            }
            None => Ok(()),
        }
    }

    fn describe(&self, desc: &mut SegmentDescriptor) {
        if let Some(st) = self.started.get() {
            desc.set_section(&st.info);
        }
    }

    /// Same host, and attaching is allowed: a peer this process may not attach to (another
    /// user, a seccomp profile without process_vm_*) is left to the other transports. A peer that
    /// died still counts, so its requests fail with the typed disconnect error.
    fn can_reach(&self, target: &RemoteSegment) -> bool {
        if !identity::local().is_ok_and(|me| peer::same_host(&target.descriptor, me)) {
            return false;
        }
        let cached = sync::read(&self.peers).get(&target.name).map(|e| !e.conn.is_dead());
        if cached == Some(true) {
            return true;
        }
        match self.peer_for(&Arc::new(target.clone())) {
            Ok(_) => true,
            Err(e) => e.is_disconnect(),
        }
    }

    /// Only buffers in the peer's registration table: its host memory (device memory is not published).
    fn can_reach_buffer(&self, _target: &RemoteSegment, buffer: &BufferDesc) -> bool {
        buffer.fields.contains_key(peer::FIELD_SLOT)
    }

    async fn connect(&self, target: &RemoteSegment) -> Result<()> {
        let st = self.started.get().ok_or_else(|| Error::NotInitialized("shm transport not started".into()))?;
        self.peer_or_report(st, &Arc::new(target.clone())).map(|_| ())
    }

    fn submit(&self, target: &Arc<RemoteSegment>, tasks: Vec<TransferTask>) {
        let Some(st) = self.started.get() else {
            TransferTask::fail_all(tasks, &Error::NotInitialized("shm transport not started".into()));
            return;
        };
        let peer = match self.peer_or_report(st, target) {
            Ok(p) => p,
            Err(e) => {
                TransferTask::fail_all(tasks, &e);
                return;
            }
        };
        let mut jobs = Vec::new();
        let mut small: Vec<Item> = Vec::new();
        let mut small_bytes = 0;
        for t in tasks {
            let length = t.length();
            let Some(buf) = peer.index.find(t.remote_addr, length).copied() else {
                t.completion.finish(Err(remote_range_error(&target.name, t.remote_addr, length)));
                continue;
            };
            let plan = self.config.plan(length);
            if !plan.is_striped() {
                small_bytes += length;
                small.push(Item {
                    op: t.opcode,
                    local: t.local,
                    remote: t.remote_addr,
                    buf,
                    done: Some(PieceDone::Whole(t.completion)),
                });
                if small.len() >= JOB_ITEMS || small_bytes >= JOB_BYTES {
                    jobs.push(Job { conn: peer.conn.clone(), items: std::mem::take(&mut small) });
                    small_bytes = 0;
                }
                continue;
            }
            // Equal pieces rounded to 4 KiB, one per thread; the last takes the remainder.
            let fan = Arc::new(FanIn::new(plan.stripes() as usize, length, t.completion));
            for p in plan {
                let done = PieceDone::Part(fan.clone());
                let Some(local) = t.local.sub(p.offset, p.len) else {
                    done.finish(Err(Error::InvalidArgument("stripe outside its request".into())));
                    continue;
                };
                let item = Item { op: t.opcode, local, remote: t.remote_addr + p.offset, buf, done: Some(done) };
                jobs.push(Job { conn: peer.conn.clone(), items: vec![item] });
            }
        }
        if !small.is_empty() {
            jobs.push(Job { conn: peer.conn.clone(), items: small });
        }
        st.pool.push(jobs);
    }

    fn transfer_blocking(
        &self,
        target: &Arc<RemoteSegment>,
        opcode: Opcode,
        local: &LocalRange,
        remote_addr: u64,
        timeout: Duration,
    ) -> Option<Result<u64>> {
        // Device memory is staged by the copy threads; this path copies host memory only.
        if !self.config.direct || self.config.plan(local.len()).is_striped() || !matches!(local.access(), Access::Host)
        {
            return None;
        }
        let st = self.started.get()?;
        Some(self.copy_here(st, target, opcode, local, remote_addr, timeout))
    }

    fn forget_peer(&self, segment_name: &str) {
        sync::write(&self.peers).remove(segment_name);
    }

    async fn shutdown(&self) {
        if let Some(st) = self.started.get() {
            st.pool.stop();
            if !st.table.close(CLOSE_WAIT) {
                tracing::warn!("shm: peers were still copying when the transport shut down");
            }
        }
        sync::write(&self.peers).clear();
    }
}

impl Drop for ShmTransport {
    fn drop(&mut self) {
        if let Some(st) = self.started.get() {
            st.pool.stop();
            st.table.close(CLOSE_WAIT);
        }
    }
}

/// Whether cross-memory attach works here (checked once): Linux with `process_vm_readv`
/// permitted, memfd sealing, and a readable host identity.
fn probe() -> Availability {
    static RESULT: OnceLock<Availability> = OnceLock::new();
    RESULT
        .get_or_init(|| match probe_once() {
            Ok(()) => Availability::Available,
            Err(why) => Availability::Unavailable(why),
        })
        .clone()
}

fn probe_once() -> std::result::Result<(), String> {
    identity::local().map_err(|e| e.to_string())?;
    let src = [0x5au8; 64];
    let mut dst = [0u8; 64];
    let pid = std::process::id() as i32;
    let n = sys::process_vm(
        pid,
        Opcode::Read,
        &[sys::iovec(dst.as_mut_ptr() as u64, 64)],
        &[sys::iovec(src.as_ptr() as u64, 64)],
    )
    .map_err(|e| {
        format!("process_vm_readv on this process failed ({e}): cross-memory attach is unavailable (seccomp or kernel); use tcp")
    })?;
    if n != 64 || dst != src {
        return Err(format!("process_vm_readv on this process moved {n} of 64 bytes"));
    }
    sys::sealed_memfd("mooncake-shm-probe", 4096)
        .map_err(|e| format!("memfd_create with sealing failed ({e}); the registration table needs it"))?;
    Ok(())
}

fn create(config: &BackendConfig) -> Result<Arc<dyn Transport>> {
    Ok(Arc::new(ShmTransport::new(ShmConfig::from_backend(config))))
}

mooncake_core::inventory::submit! {
    TransportFactory {
        name: NAME,
        summary: "same-host shared memory: one-copy process_vm_readv/writev, no network stack",
        probe,
        create,
    }
}

/// Call from a final binary to make sure the linker keeps this crate's registration.
pub fn link() {}

#[cfg(test)]
mod tests;
