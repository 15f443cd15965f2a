//! The data path: rails, operations in flight, and the progress thread.
//!
//! Each rail (one domain: a NIC or an interface) has a mutex-guarded [`RailState`] holding the
//! libfabric objects, a fixed table of operation slots whose addresses are the contexts handed to
//! libfabric, a queue of operations waiting to be posted, and the peers inserted in its address
//! vector. Submitting threads push operations into the rail's inbox and post them at once when
//! the rail is free; a dedicated progress thread (never the async runtime's workers) posts what
//! is left, reads the completion queue, finishes requests, retries operations cut off by a
//! connection loss while the provider reconnects, and fails operations to peers that stopped
//! answering. Manual-progress providers (tcp, shm) also need the *target* to poll, so the thread
//! keeps polling while idle: it sleeps on the CQ's file descriptor where the provider has one,
//! otherwise in short naps.

use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use mooncake_core::{Error, LocalRange, PeerEvents, PieceDone, RemoteSegment, Result, sync};
use mooncake_libfabric_sys as sys;

use crate::config::FabricConfig;
use crate::desc::{Fields, LocalPublication, RemotePeer};
use crate::fabric::{self, CqError, FiError, Hints, InfoList, Poll, Post};
use crate::local;

/// Completion-queue entries read per call.
const CQ_BATCH: usize = 64;
/// How often in-flight operations are checked against the peer timeout.
const SCAN_EVERY: Duration = Duration::from_millis(10);
/// Longest back-off between re-posts of an operation cut off by a connection loss.
const MAX_BACKOFF: Duration = Duration::from_millis(32);
/// Operations outstanding this long to a same-host peer trigger a check that its process lives.
const LIVENESS_AFTER: Duration = Duration::from_millis(20);
/// First nap of an idle progress thread without a wait object (doubles up to `idle_us`).
const NAP_MIN: Duration = Duration::from_micros(5);
/// Operations refused with `EAGAIN` set aside per posting pass before giving up the pass.
const MAX_AGAIN: usize = 4;
/// Longest sleep on a wait file descriptor (timeouts are checked at least this often).
const FD_WAIT_MS: i32 = 10;

/// Maps a libfabric failure outside the data path (setup, registration) to a typed error.
pub(crate) fn setup_error(provider: &str, e: &FiError) -> Error {
    match e.code {
        sys::FI_ENOMEM | sys::FI_ENOSPC => Error::NoSpace(format!("libfabric ({provider}): {e}")),
        _ => Error::unavailable(format!("libfabric ({provider}): {e}")),
    }
}

/// How a failed operation is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// The target refused the access (bad key or range): no retry.
    Rejected,
    /// The connection to the peer failed: retry while the provider reconnects.
    Connection,
    /// Refused access or lost peer: tcp cancels the operation with ENOENT in both cases (and
    /// drops the connection). Retried like a connection loss; refused again once the provider
    /// reconnected means the target is alive and rejects the access.
    Ambiguous,
    /// Anything else: the provider failed.
    Other,
}

/// Classifies a completion or post error by its generic code and the provider's errno.
pub(crate) fn classify(code: u32, prov_errno: i32) -> Class {
    match code {
        sys::FI_EACCES | sys::FI_EKEYREJECTED | sys::FI_EFAULT | sys::FI_EINVAL | sys::FI_EPERM | sys::FI_ENOKEY => {
            Class::Rejected
        }
        sys::FI_ECANCELED if matches!(prov_errno, libc::ENOENT | libc::EINVAL | libc::EACCES | libc::EFAULT) => {
            Class::Ambiguous
        }
        sys::FI_ENOTCONN
        | sys::FI_ECONNRESET
        | sys::FI_ECONNREFUSED
        | sys::FI_ECONNABORTED
        | sys::FI_ESHUTDOWN
        | sys::FI_EHOSTUNREACH
        | sys::FI_ETIMEDOUT
        | sys::FI_ECANCELED
        | sys::FI_EIO
        | sys::FI_EREMOTEIO => Class::Connection,
        _ if matches!(prov_errno, libc::EPIPE | libc::ECONNRESET | libc::ESRCH) => Class::Connection,
        _ => Class::Other,
    }
}

/// A peer as the data path sees it: its parsed publication.
pub(crate) struct Peer {
    /// Segment name.
    pub name: String,
    /// The descriptor this was built from (identity: rebuilt when the engine refreshes it).
    pub segment: Arc<RemoteSegment>,
    /// Parsed fields.
    pub info: RemotePeer,
    /// Remote rail addresses.
    pub addrs: Vec<Arc<[u8]>>,
    /// The peer's endpoints live (or lived) in this process: posts first check they are open.
    pub local: bool,
    /// The peer's pid, when it runs on this host in this pid namespace (liveness checks).
    pub pid: Option<i32>,
    /// The peer's process is known to be gone.
    dead: AtomicBool,
    /// Last liveness check (ns since epoch).
    last_check: AtomicU64,
    /// Last successful completion (ns since the core's epoch).
    last_ok: AtomicU64,
    /// Last time the engine was told this peer failed (ns since epoch; rate limit).
    last_notice: AtomicU64,
}

impl Peer {
    /// `other_process`: the peer's published identity says it is not this process (see
    /// [`crate::desc::is_other_process`]); otherwise it is ours when one of its addresses is or
    /// was an endpoint of this process.
    pub(crate) fn new(
        segment: Arc<RemoteSegment>,
        info: RemotePeer,
        provider: &str,
        pid: Option<i32>,
        other_process: bool,
    ) -> Peer {
        let addrs: Vec<Arc<[u8]>> = info.addrs.iter().map(|a| Arc::from(a.as_slice())).collect();
        let local = !other_process && addrs.iter().any(|a| local::is_local(provider, a));
        Peer {
            name: segment.name.clone(),
            segment,
            info,
            addrs,
            local,
            pid: pid.filter(|p| *p != std::process::id() as i32),
            dead: AtomicBool::new(false),
            last_check: AtomicU64::new(0),
            last_ok: AtomicU64::new(0),
            last_notice: AtomicU64::new(0),
        }
    }
}

/// True when the process `pid` no longer exists (`kill(pid, 0)` fails with ESRCH).
fn process_gone(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; nothing is delivered.
    let ret = unsafe { libc::kill(pid, 0) };
    ret != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// One RMA operation.
pub(crate) struct Op {
    pub write: bool,
    /// The local range with its proof; it keeps the local region registered until the operation is done.
    pub local: LocalRange,
    pub len: u64,
    /// Remote address as posted (virtual address or offset into the registration).
    pub remote: u64,
    /// Absolute remote address (for messages).
    pub remote_abs: u64,
    pub key: u64,
    pub peer: Arc<Peer>,
    pub remote_rail: usize,
    pub done: PieceDone,
    pub queued: Instant,
    pub retry_until: Option<Instant>,
    pub attempts: u32,
    /// Failed once in a way that may be a refused access (see [`Class::Ambiguous`]).
    pub suspect: bool,
}

/// Storage libfabric may use as the operation context (`fi_context2`, 64 bytes).
#[repr(C, align(8))]
struct Ctx(std::cell::UnsafeCell<[u64; 8]>);

/// An operation slot; its address is the context given to libfabric.
#[repr(C)]
struct Slot {
    ctx: Ctx,
    op: Option<Op>,
    posted: Instant,
    /// Failed by timeout while still posted: freed when its completion finally arrives.
    abandoned: bool,
}

/// The mutable state of one rail (behind its mutex).
pub(crate) struct RailState {
    rail: fabric::Rail,
    slots: Box<[Slot]>,
    free: Vec<u32>,
    inflight: usize,
    queue: VecDeque<Op>,
    retry: Vec<(Instant, Op)>,
    av: HashMap<Arc<[u8]>, sys::fi_addr_t>,
    last_scan: Instant,
    /// Peers' accesses to our memory seen so far (remote-access counter).
    remote_seen: u64,
}

// SAFETY: `fabric::Rail` is Send; the slot contexts are plain integers that only libfabric writes,
// during calls made while the rail's mutex is held.
unsafe impl Send for RailState {}

impl RailState {
    fn outstanding(&self) -> bool {
        self.inflight > 0 || !self.queue.is_empty() || !self.retry.is_empty()
    }

    fn slot_of(&self, ctx: *mut c_void) -> Option<usize> {
        let base = self.slots.as_ptr() as usize;
        let off = (ctx as usize).checked_sub(base)?;
        let size = std::mem::size_of::<Slot>();
        (off % size == 0 && off / size < self.slots.len()).then_some(off / size)
    }
}

/// A rail and its inbox.
pub(crate) struct RailHandle {
    /// Domain name.
    pub domain: String,
    /// Endpoint address.
    pub addr: Vec<u8>,
    /// Remote addresses are virtual addresses (else offsets into the registration).
    pub virt_addr: bool,
    /// Largest operation.
    pub max_msg: u64,
    /// Local buffers need a registration descriptor.
    pub local_mr: bool,
    /// Key space of requested keys (bytes).
    pub key_size: usize,
    wait_fd: Option<i32>,
    state: Mutex<Option<RailState>>,
    inbox: Mutex<Vec<Op>>,
    inbox_full: AtomicBool,
}

/// What becomes of a failed operation.
enum Fate {
    /// Post it again at this time.
    Retry(Instant, Op),
    /// Finish it with this error.
    Fail(Op, Error),
}

/// What [`Core::post`] did with an operation.
enum Posted {
    Yes,
    Again(Op),
    No(Op, Error),
}

/// Wakes the progress thread when it sleeps.
struct Waker {
    eventfd: Option<std::os::fd::OwnedFd>,
    sleeping: AtomicBool,
    thread: OnceLock<std::thread::Thread>,
}

impl Waker {
    fn new() -> Waker {
        // SAFETY: plain syscall; a returned descriptor >= 0 is owned by us from here on.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        let eventfd = (fd >= 0).then(|| {
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
        });
        Waker { eventfd, sleeping: AtomicBool::new(false), thread: OnceLock::new() }
    }

    fn wake(&self) {
        if !self.sleeping.load(Ordering::SeqCst) {
            return;
        }
        if let Some(fd) = &self.eventfd {
            let one: u64 = 1;
            // SAFETY: writing 8 bytes from a local to our eventfd.
            let _ = unsafe { libc::write(std::os::fd::AsRawFd::as_raw_fd(fd), (&raw const one).cast::<c_void>(), 8) };
        }
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    fn drain(&self) {
        if let Some(fd) = &self.eventfd {
            let mut v: u64 = 0;
            // SAFETY: reading 8 bytes into a local from our non-blocking eventfd.
            let _ = unsafe { libc::read(std::os::fd::AsRawFd::as_raw_fd(fd), (&raw mut v).cast::<c_void>(), 8) };
        }
    }
}

/// Everything of one started transport instance.
pub(crate) struct Core {
    pub config: FabricConfig,
    pub fields: Fields,
    pub rails: Vec<RailHandle>,
    pub publication: LocalPublication,
    events: Arc<dyn PeerEvents>,
    waker: Waker,
    stop: AtomicBool,
    rr: AtomicUsize,
    epoch: Instant,
    closed: AtomicBool,
}

/// Process-wide source of requested memory keys (each MR of a domain needs its own).
static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

/// A fresh key for a provider whose keys are `key_size` bytes.
pub(crate) fn next_key(key_size: usize) -> u64 {
    let k = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
    if key_size >= 8 || key_size == 0 {
        k
    } else {
        let space = 1u64 << (8 * key_size as u32);
        // Keep 0 out: some providers treat it specially.
        1 + (k - 1) % (space - 1)
    }
}

fn wildcard(host: &str) -> bool {
    matches!(host.trim(), "" | "0.0.0.0" | "::" | "[::]" | "*")
}

/// Opens the rails of `config.provider`: every domain (NIC) for fabric providers, the interface
/// that serves `bind_host` for socket providers.
pub(crate) fn open_rails(config: &FabricConfig, bind_host: &str) -> Result<Vec<fabric::Rail>> {
    let p = &config.provider;
    let base = Hints {
        provider: Some(p.clone()),
        mr_mode: config.mr_mode.unwrap_or(0),
        mr_mode_set: config.mr_mode.is_some(),
        ..Default::default()
    };
    // Most wanted first: remote-access counting (where configured) and delivery-complete
    // semantics; providers without FI_DELIVERY_COMPLETE complete a write once it is sent.
    let mut tries = vec![(true, config.rma_event), (true, false), (false, false)];
    tries.dedup();
    let mut found = None;
    for (dc, ev) in tries {
        let hints = Hints { delivery_complete: dc, rma_event: ev, ..base.clone() };
        let list = InfoList::query(&hints).map_err(|e| setup_error(p, &e))?;
        if !list.is_empty() {
            found = Some((hints, list));
            break;
        }
    }
    let Some((hints, mut list)) = found else {
        return Err(Error::unavailable(format!("no {p} provider: fi_getinfo found no RDM endpoint with RMA")));
    };
    let Some(first) = list.iter().next() else {
        return Err(Error::unavailable(format!("no {p} provider: fi_getinfo found no RDM endpoint with RMA")));
    };
    let socket = first.attrs().socket_addressed();
    let mut one_rail = false;
    if socket && config.domains.is_empty() && !wildcard(bind_host) {
        let host = bind_host.trim().trim_start_matches('[').trim_end_matches(']').to_string();
        let bound = InfoList::query(&Hints { source_node: Some(host), ..hints.clone() });
        if let Ok(bound) = bound {
            if !bound.is_empty() {
                list = bound;
            }
        }
        one_rail = true;
    }
    let mut domains: Vec<String> = Vec::new();
    for i in list.iter() {
        let d = i.attrs().domain;
        if !domains.contains(&d) && (config.domains.is_empty() || config.domains.contains(&d)) {
            domains.push(d);
        }
    }
    if domains.is_empty() {
        return Err(Error::unavailable(format!(
            "{p}: none of the configured domains {:?} exists here (MC_LIBFABRIC_DOMAINS)",
            config.domains
        )));
    }
    let want = if one_rail { 1 } else { config.max_rails };
    let mut rails = Vec::new();
    for d in domains.iter().take(want) {
        let Some(info) = list.iter().find(|i| i.attrs().domain == *d) else { continue };
        let depth = queue_depth(config, info.attrs().tx_size);
        let rail = fabric::Rail::open(info, depth * 2, config.wait_fd).map_err(|e| setup_error(p, &e))?;
        rails.push(rail);
    }
    Ok(rails)
}

fn queue_depth(config: &FabricConfig, tx_size: usize) -> usize {
    if config.depth > 0 { config.depth } else { tx_size.clamp(64, 4096) }
}

impl Core {
    /// Builds the core over opened rails.
    pub(crate) fn new(
        protocol: &str,
        config: FabricConfig,
        rails: Vec<fabric::Rail>,
        events: Arc<dyn PeerEvents>,
    ) -> Core {
        let fields = Fields::new(protocol);
        let mut handles = Vec::new();
        for rail in rails {
            let a = rail.attrs().clone();
            let depth = queue_depth(&config, a.tx_size);
            let slots: Box<[Slot]> = (0..depth)
                .map(|_| Slot {
                    ctx: Ctx(std::cell::UnsafeCell::new([0; 8])),
                    op: None,
                    posted: Instant::now(),
                    abandoned: false,
                })
                .collect();
            let provider_max = if a.max_msg_size == 0 { u64::MAX } else { a.max_msg_size };
            let max_msg = if config.max_msg > 0 { config.max_msg.min(provider_max) } else { provider_max };
            let addr = rail.name().to_vec();
            local::opened(&config.provider, &addr);
            handles.push(RailHandle {
                domain: a.domain.clone(),
                addr,
                virt_addr: a.virt_addr(),
                max_msg,
                local_mr: a.local_mr(),
                key_size: a.mr_key_size,
                wait_fd: rail.wait_fd(),
                state: Mutex::new(Some(RailState {
                    rail,
                    free: (0..depth as u32).rev().collect(),
                    slots,
                    inflight: 0,
                    queue: VecDeque::new(),
                    retry: Vec::new(),
                    av: HashMap::new(),
                    last_scan: Instant::now(),
                    remote_seen: 0,
                })),
                inbox: Mutex::new(Vec::new()),
                inbox_full: AtomicBool::new(false),
            });
        }
        let publication = LocalPublication {
            provider: config.provider.clone(),
            addrs: handles.iter().map(|h| h.addr.clone()).collect(),
            devices: handles.iter().map(|h| h.domain.clone()).collect(),
            node: crate::desc::hostname(),
            pid: crate::desc::process_id(),
        };
        Core {
            config,
            fields,
            rails: handles,
            publication,
            events,
            waker: Waker::new(),
            stop: AtomicBool::new(false),
            rr: AtomicUsize::new(0),
            epoch: Instant::now(),
            closed: AtomicBool::new(false),
        }
    }

    fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The rail a new request starts on (round-robin).
    pub(crate) fn next_rail(&self) -> usize {
        self.rr.fetch_add(1, Ordering::Relaxed) % self.rails.len().max(1)
    }

    /// Registers `[addr, addr+len)` on every rail; returns the key of each rail.
    pub(crate) fn register(&self, addr: u64, len: u64) -> Result<Vec<u64>> {
        let mut keys = Vec::with_capacity(self.rails.len());
        for (i, h) in self.rails.iter().enumerate() {
            let r = {
                let mut g = sync::lock(&h.state);
                match g.as_mut() {
                    Some(st) => st.rail.register(addr, addr, len, next_key(h.key_size)),
                    None => Err(FiError { call: "fi_mr_reg", code: sys::FI_ESHUTDOWN, message: "shut down".into() }),
                }
            };
            match r {
                Ok(k) => keys.push(k),
                Err(e) => {
                    for h in &self.rails[..i] {
                        if let Some(st) = sync::lock(&h.state).as_mut() {
                            st.rail.unregister(addr);
                        }
                    }
                    return Err(setup_error(&self.config.provider, &e));
                }
            }
        }
        Ok(keys)
    }

    /// Drops the registration starting at `addr` on every rail.
    pub(crate) fn unregister(&self, addr: u64) {
        for h in &self.rails {
            if let Some(st) = sync::lock(&h.state).as_mut() {
                st.rail.unregister(addr);
            }
        }
    }

    /// Queues operations on rail `rail` and posts them right away when the rail is free.
    pub(crate) fn enqueue(&self, rail: usize, ops: impl IntoIterator<Item = Op>) {
        let Some(h) = self.rails.get(rail) else { return };
        {
            let mut inbox = sync::lock(&h.inbox);
            inbox.extend(ops);
            h.inbox_full.store(true, Ordering::Release);
        }
        if self.is_closed() {
            // Raced with shutdown: nobody will post these.
            for d in self.drain_inbox(h) {
                d.finish(Err(Error::Canceled));
            }
            return;
        }
        // Post on this thread when nobody else is using the rail (saves a hand-off).
        let mut done = Vec::new();
        if let Ok(mut g) = h.state.try_lock() {
            if let Some(st) = g.as_mut() {
                self.take_inbox(h, st);
                self.post_queued(h, st, &mut done);
            }
        }
        for (d, r) in done {
            d.finish(r);
        }
        self.waker.wake();
    }

    fn take_inbox(&self, h: &RailHandle, st: &mut RailState) {
        if !h.inbox_full.swap(false, Ordering::AcqRel) {
            return;
        }
        let mut inbox = sync::lock(&h.inbox);
        st.queue.extend(inbox.drain(..));
    }

    /// Posts queued operations until the queue is empty or the provider keeps refusing
    /// (`EAGAIN`). An operation refused for one peer (still connecting) does not hold back the
    /// others: up to [`MAX_AGAIN`] refused ones are set aside per pass and put back in front.
    fn post_queued(&self, h: &RailHandle, st: &mut RailState, done: &mut Vec<(PieceDone, Result<u64>)>) -> bool {
        let mut any = false;
        let mut again: Vec<Op> = Vec::new();
        while let Some(op) = st.queue.pop_front() {
            match self.post(h, st, op) {
                Posted::Yes => any = true,
                Posted::Again(op) => {
                    again.push(op);
                    if again.len() >= MAX_AGAIN || st.free.is_empty() {
                        break;
                    }
                }
                Posted::No(op, e) => {
                    any = true;
                    done.push((op.done, Err(e)));
                }
            }
        }
        for op in again.into_iter().rev() {
            st.queue.push_front(op);
        }
        any
    }

    /// Posts one operation (or says why not).
    fn post(&self, h: &RailHandle, st: &mut RailState, op: Op) -> Posted {
        if op.done.is_final() {
            // Canceled or timed out by the engine before it started.
            return Posted::Yes;
        }
        if op.peer.dead.load(Ordering::Relaxed) {
            let e = Error::disconnected(&op.peer.name, "its process on this host is gone");
            return Posted::No(op, e);
        }
        let Some(remote_addr) = op.peer.addrs.get(op.remote_rail).cloned() else {
            let e = Error::unavailable(format!("peer {} has no rail {}", op.peer.name, op.remote_rail));
            return Posted::No(op, e);
        };
        let fi_addr = match st.av.get(&remote_addr) {
            Some(a) => *a,
            None => {
                if op.peer.local && local::while_open(&self.config.provider, &remote_addr, || ()).is_none() {
                    let e = Error::disconnected(&op.peer.name, "its endpoint (in this process) was closed");
                    return Posted::No(op, e);
                }
                match st.rail.insert_peer(&remote_addr) {
                    Ok(a) => {
                        st.av.insert(remote_addr.clone(), a);
                        a
                    }
                    Err(e) => {
                        let err = Error::disconnected(&op.peer.name, format!("address not usable: {e}"));
                        return Posted::No(op, err);
                    }
                }
            }
        };
        let desc = match st.rail.local_desc(op.local.addr(), op.len) {
            Some(d) => d,
            None if h.local_mr => {
                let e = Error::AddressNotRegistered {
                    addr: op.local.addr(),
                    len: op.len,
                    context: format!("local buffer not registered with libfabric rail {}", h.domain),
                };
                return Posted::No(op, e);
            }
            None => std::ptr::null_mut(),
        };
        let Some(idx) = st.free.pop() else { return Posted::Again(op) };
        let idx = idx as usize;
        let ctx = st.slots[idx].ctx.0.get().cast::<c_void>();
        let Ok(len) = usize::try_from(op.len) else {
            st.free.push(idx as u32);
            let e = Error::InvalidArgument(format!("{} bytes do not fit this platform", op.len));
            return Posted::No(op, e);
        };
        let rma = fabric::Rma {
            write: op.write,
            local: op.local.addr(),
            len,
            desc,
            dest: fi_addr,
            remote: op.remote,
            key: op.key,
            context: ctx,
        };
        let rail = &mut st.rail;
        // SAFETY: the local range lies in registered memory (checked when the task was planned; `op.local`
        // holds the region until the operation completes), and `desc` is its registration's descriptor
        // (or NULL where the provider needs none); `ctx` points into the slot table, which lives
        // (and is not reused) until this operation's completion is read or the rail is closed.
        let mut do_post = || unsafe { rail.post(&rma) };
        let result = if op.peer.local {
            match local::while_open(&self.config.provider, &remote_addr, do_post) {
                Some(r) => r,
                None => {
                    st.free.push(idx as u32);
                    let e = Error::disconnected(&op.peer.name, "its endpoint (in this process) was closed");
                    return Posted::No(op, e);
                }
            }
        } else {
            do_post()
        };
        match result {
            Post::Posted => {
                let slot = &mut st.slots[idx];
                slot.op = Some(op);
                slot.posted = Instant::now();
                slot.abandoned = false;
                st.inflight += 1;
                Posted::Yes
            }
            Post::Again => {
                st.free.push(idx as u32);
                Posted::Again(op)
            }
            Post::Failed(e) => {
                st.free.push(idx as u32);
                match self.failure(op, &e, 0) {
                    Fate::Fail(op, err) => Posted::No(op, err),
                    Fate::Retry(at, op) => {
                        st.retry.push((at, op));
                        Posted::Yes
                    }
                }
            }
        }
    }

    /// Decides what a failed operation becomes.
    fn failure(&self, mut op: Op, e: &FiError, prov_errno: i32) -> Fate {
        let class = match classify(e.code, prov_errno) {
            Class::Ambiguous if op.suspect => Class::Rejected,
            Class::Ambiguous => {
                op.suspect = true;
                Class::Connection
            }
            c => c,
        };
        match class {
            Class::Rejected => {
                self.notice(&op.peer);
                let err = Error::RemoteRejected { peer: op.peer.name.clone(), addr: op.remote_abs, len: op.len };
                Fate::Fail(op, err)
            }
            Class::Connection | Class::Ambiguous => {
                let now = Instant::now();
                let until = *op.retry_until.get_or_insert(now + self.config.reconnect);
                if now >= until || self.stop.load(Ordering::Acquire) {
                    self.notice(&op.peer);
                    let reason = format!("{e}; no reconnection within {:?}", self.config.reconnect);
                    let err = Error::disconnected(&op.peer.name, reason);
                    return Fate::Fail(op, err);
                }
                op.attempts += 1;
                let backoff = Duration::from_millis(1u64 << op.attempts.min(5)).min(MAX_BACKOFF);
                Fate::Retry(now + backoff, op)
            }
            Class::Other => {
                let err = Error::unavailable(format!("libfabric provider {} failed: {e}", self.config.provider));
                Fate::Fail(op, err)
            }
        }
    }

    /// Whether a same-host peer's process is gone (checked at most every [`SCAN_EVERY`]).
    fn peer_gone(&self, peer: &Peer, now: Instant) -> bool {
        let Some(pid) = peer.pid else { return false };
        if peer.dead.load(Ordering::Relaxed) {
            return true;
        }
        let t = self.nanos(now);
        let last = peer.last_check.load(Ordering::Relaxed);
        if t.saturating_sub(last) < SCAN_EVERY.as_nanos() as u64 {
            return false;
        }
        peer.last_check.store(t, Ordering::Relaxed);
        let gone = process_gone(pid);
        if gone {
            tracing::debug!(peer = %peer.name, pid, "libfabric peer process is gone");
            peer.dead.store(true, Ordering::Relaxed);
        }
        gone
    }

    fn notice(&self, peer: &Peer) {
        let now = self.nanos(Instant::now());
        let last = peer.last_notice.load(Ordering::Relaxed);
        if last == 0 || now.saturating_sub(last) > 100_000_000 {
            peer.last_notice.store(now.max(1), Ordering::Relaxed);
            self.events.peer_failed(&peer.name);
        }
    }
}

impl Core {
    /// One pass over one rail: take the inbox, move due retries, post, read completions, check
    /// timeouts. Returns whether anything happened.
    fn progress_rail(
        &self,
        h: &RailHandle,
        st: &mut RailState,
        entries: &mut [sys::fi_cq_entry],
        done: &mut Vec<(PieceDone, Result<u64>)>,
    ) -> bool {
        let now = Instant::now();
        self.take_inbox(h, st);
        let mut i = 0;
        while i < st.retry.len() {
            if st.retry[i].0 <= now {
                let (_, op) = st.retry.swap_remove(i);
                st.queue.push_back(op);
            } else {
                i += 1;
            }
        }
        let mut active = self.post_queued(h, st, done);
        for _ in 0..8 {
            match st.rail.poll(entries) {
                Poll::Done(n) => {
                    active = true;
                    for e in &entries[..n] {
                        self.completed(st, e.op_context, now, done);
                    }
                    if n < entries.len() {
                        break;
                    }
                }
                Poll::Empty => break,
                Poll::Failed(err) => {
                    active = true;
                    self.failed(st, err, done);
                }
            }
        }
        if active && !st.queue.is_empty() {
            self.post_queued(h, st, done);
        }
        // Serving a peer (one-sided accesses to our memory) counts as activity: keep polling.
        if let Some(n) = st.rail.remote_events() {
            if n != st.remote_seen {
                st.remote_seen = n;
                active = true;
            }
        }
        if now.saturating_duration_since(st.last_scan) >= SCAN_EVERY {
            st.last_scan = now;
            self.scan(st, now, done);
        }
        active
    }

    /// Frees the slot of a finished operation; returns the operation unless the slot was
    /// abandoned (already failed by timeout) or unknown.
    fn release(st: &mut RailState, ctx: *mut c_void) -> Option<Op> {
        let Some(i) = st.slot_of(ctx) else {
            tracing::warn!(?ctx, "libfabric returned a completion with an unknown context");
            return None;
        };
        let slot = &mut st.slots[i];
        let abandoned = std::mem::replace(&mut slot.abandoned, false);
        let op = slot.op.take();
        if abandoned || op.is_some() {
            st.free.push(i as u32);
        }
        if op.is_some() {
            st.inflight -= 1;
        }
        op
    }

    fn completed(&self, st: &mut RailState, ctx: *mut c_void, now: Instant, done: &mut Vec<(PieceDone, Result<u64>)>) {
        if let Some(op) = Self::release(st, ctx) {
            op.peer.last_ok.store(self.nanos(now), Ordering::Relaxed);
            done.push((op.done, Ok(op.len)));
        }
    }

    fn failed(&self, st: &mut RailState, err: CqError, done: &mut Vec<(PieceDone, Result<u64>)>) {
        if err.context.is_null() {
            tracing::warn!(error = %err.error, provider = %self.config.provider, "libfabric completion queue error");
            return;
        }
        let Some(op) = Self::release(st, err.context) else { return };
        tracing::debug!(peer = %op.peer.name, error = %err.error, "libfabric operation failed");
        match self.failure(op, &err.error, err.prov_errno) {
            Fate::Fail(op, e) => done.push((op.done, Err(e))),
            Fate::Retry(at, op) => st.retry.push((at, op)),
        }
    }

    /// Fails operations to peers that stopped answering, and operations that could not be
    /// posted for too long.
    fn scan(&self, st: &mut RailState, now: Instant, done: &mut Vec<(PieceDone, Result<u64>)>) {
        let timeout = self.config.timeout;
        for i in 0..st.slots.len() {
            let expired = match &st.slots[i].op {
                Some(op) => {
                    let ok = self.epoch + Duration::from_nanos(op.peer.last_ok.load(Ordering::Relaxed));
                    let quiet = now.saturating_duration_since(st.slots[i].posted.max(ok));
                    quiet > timeout || (quiet > LIVENESS_AFTER && self.peer_gone(&op.peer, now))
                }
                None => false,
            };
            if !expired {
                continue;
            }
            let slot = &mut st.slots[i];
            if let Some(op) = slot.op.take() {
                // The provider still owns the slot's context: keep it until the completion shows up.
                slot.abandoned = true;
                st.inflight -= 1;
                self.notice(&op.peer);
                tracing::debug!(peer = %op.peer.name, ?timeout, "libfabric operation timed out");
                let e = if op.peer.dead.load(Ordering::Relaxed) {
                    Error::disconnected(&op.peer.name, "its process on this host is gone")
                } else {
                    Error::disconnected(&op.peer.name, format!("no completion within {timeout:?}"))
                };
                done.push((op.done, Err(e)));
            }
        }
        // Queued operations whose peer makes no progress: connecting for too long, or still
        // unreachable at the end of their reconnection window.
        for _ in 0..st.queue.len() {
            let Some(op) = st.queue.pop_front() else { break };
            let ok = self.epoch + Duration::from_nanos(op.peer.last_ok.load(Ordering::Relaxed));
            let quiet = now.saturating_duration_since(op.queued.max(ok));
            let stuck = match op.retry_until {
                Some(until) => now >= until,
                None => quiet > timeout,
            } || (quiet > LIVENESS_AFTER && self.peer_gone(&op.peer, now));
            if stuck {
                self.notice(&op.peer);
                tracing::debug!(peer = %op.peer.name, "libfabric operation could not be posted");
                let why = match op.retry_until {
                    Some(_) => format!("connection lost; not re-established within {:?}", self.config.reconnect),
                    None => format!("could not be posted within {timeout:?}"),
                };
                done.push((op.done, Err(Error::disconnected(&op.peer.name, why))));
            } else {
                st.queue.push_back(op);
            }
        }
    }

    /// The progress thread's body: runs until [`Core::stop`].
    pub(crate) fn run(self: Arc<Self>) {
        let _ = self.waker.thread.set(std::thread::current());
        let mut entries = vec![sys::fi_cq_entry::default(); CQ_BATCH];
        let mut done: Vec<(PieceDone, Result<u64>)> = Vec::with_capacity(CQ_BATCH * 2);
        let mut pollfds: Vec<libc::pollfd> = Vec::with_capacity(self.rails.len() + 1);
        let use_fds = self.config.wait_fd && self.rails.iter().all(|h| h.wait_fd.is_some());
        if use_fds {
            for h in &self.rails {
                pollfds.push(libc::pollfd { fd: h.wait_fd.unwrap_or(-1), events: libc::POLLIN, revents: 0 });
            }
            if let Some(fd) = &self.waker.eventfd {
                pollfds.push(libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(fd),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
        }
        // Short naps must be short: the default 50 us timer slack would stretch them.
        // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
        let mut last_active = Instant::now();
        let mut spins = 0u32;
        let mut nap = NAP_MIN;
        while !self.stop.load(Ordering::Acquire) {
            let mut active = false;
            let mut outstanding = false;
            for h in &self.rails {
                {
                    let mut g = sync::lock(&h.state);
                    if let Some(st) = g.as_mut() {
                        active |= self.progress_rail(h, st, &mut entries, &mut done);
                        outstanding |= st.outstanding();
                    }
                }
                for (d, r) in done.drain(..) {
                    d.finish(r);
                }
            }
            let now = Instant::now();
            if active {
                last_active = now;
                nap = NAP_MIN;
                continue;
            }
            let busy = outstanding
                || self.config.idle_sleep.is_zero()
                || now.saturating_duration_since(last_active) < self.config.spin;
            if busy {
                spins = spins.wrapping_add(1);
                if spins % 64 == 0 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            self.idle_wait(use_fds, &mut pollfds, nap.min(self.config.idle_sleep));
            // Naps grow while nothing happens: short right after activity, `idle_us` at most.
            nap = (nap * 2).min(self.config.idle_sleep);
        }
    }

    /// Sleeps until woken, until the wait descriptors signal work, or for a short nap.
    fn idle_wait(&self, use_fds: bool, pollfds: &mut [libc::pollfd], nap: Duration) {
        self.waker.sleeping.store(true, Ordering::SeqCst);
        // Submitters check `sleeping` after filling the inbox: look again before sleeping.
        if self.stop.load(Ordering::Acquire) || self.rails.iter().any(|h| h.inbox_full.load(Ordering::Acquire)) {
            self.waker.sleeping.store(false, Ordering::SeqCst);
            return;
        }
        if use_fds {
            let quiet = self.rails.iter().all(|h| sync::lock(&h.state).as_mut().is_none_or(|st| st.rail.trywait()));
            if quiet {
                for p in pollfds.iter_mut() {
                    p.revents = 0;
                }
                // SAFETY: `pollfds` is a valid array of pollfd of the given length.
                let _ = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, FD_WAIT_MS) };
                self.waker.drain();
            }
        } else {
            std::thread::park_timeout(nap);
        }
        self.waker.sleeping.store(false, Ordering::SeqCst);
    }

    /// Asks the progress thread to stop (join it, then call [`Core::close`]).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.waker.sleeping.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    /// True once [`Core::close`] ran.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Closes every rail (after the progress thread stopped) and fails what was still queued or
    /// in flight with [`Error::Canceled`]. Idempotent.
    pub(crate) fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        local::closing(&self.config.provider, &self.publication.addrs);
        for h in &self.rails {
            let state = sync::lock(&h.state).take();
            let mut cut: Vec<PieceDone> = Vec::new();
            if let Some(mut st) = state {
                cut.extend(st.queue.drain(..).map(|op| op.done));
                cut.extend(st.retry.drain(..).map(|(_, op)| op.done));
                for slot in st.slots.iter_mut() {
                    if let Some(op) = slot.op.take() {
                        cut.push(op.done);
                    }
                }
                // Close the endpoint before reporting: libfabric no longer touches the buffers.
                drop(st);
            }
            cut.extend(self.drain_inbox(h));
            for d in cut {
                d.finish(Err(Error::Canceled));
            }
        }
    }

    /// Takes whatever sits in a rail's inbox (used once the rail is closed).
    pub(crate) fn drain_inbox(&self, h: &RailHandle) -> Vec<PieceDone> {
        let mut inbox = sync::lock(&h.inbox);
        h.inbox_full.store(false, Ordering::Release);
        inbox.drain(..).map(|op| op.done).collect()
    }
}
