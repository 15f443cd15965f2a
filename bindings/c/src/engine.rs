//! Upstream's `transfer_engine_c.h` over [`mooncake::TransferEngine`].
//!
//! Return values follow upstream: `0` for success and a negative upstream transfer-engine code
//! ([`mooncake::Error::code`]) for failure, `-1` (`ERR_INVALID_ARGUMENT`) for a null pointer, a bad length or a
//! dead handle; `NULL` from `createTransferEngine`/`installTransport` and `INVALID_BATCH` from `allocateBatchID`
//! on failure.
//!
//! The engine starts at the first `installTransport` (with that protocol as its primary transport), or with
//! `tcp` (and the automatic same-host transports) at the first call that needs it, or at once with
//! `auto_discover != 0`.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Arc, Mutex, OnceLock};

use mooncake::{
    BatchId, EngineConfig, Error, Notification, Opcode, Result, SegmentHandle, TransferEngine, TransferRequest,
    TransferState,
};

use crate::handles::Table;
use crate::util::{guard, slice_arg, slice_out, str_arg, write_str};

/// Upstream's `segment_handle_t` (a `#define` there).
pub type segment_handle_t = i32;
/// Upstream's `segment_id_t` (a `#define` there): the id `openSegment` returns.
pub type segment_id_t = i32;
/// Upstream's `file_id_t` (a `#define` there).
pub type file_id_t = u32;
/// Upstream's `batch_id_t` (a `#define` there).
pub type batch_id_t = u64;
/// An engine handle (a generation-checked table index, never a pointer).
pub type transfer_engine_t = *mut c_void;
/// A transport handle: opaque and non-null on success; only its nullness means anything.
pub type transport_t = *mut c_void;

/// The segment id of the local segment, as upstream.
pub const LOCAL_SEGMENT: segment_id_t = 0;
/// What `allocateBatchID` returns on failure.
pub const INVALID_BATCH: batch_id_t = u64::MAX;
/// `transfer_request::opcode`: read remote memory into `source`.
pub const OPCODE_READ: c_int = 0;
/// `transfer_request::opcode`: write `source` into remote memory.
pub const OPCODE_WRITE: c_int = 1;
/// `transfer_status::status`: not submitted yet.
pub const STATUS_WAITING: c_int = 0;
/// `transfer_status::status`: in flight.
pub const STATUS_PENDING: c_int = 1;
/// `transfer_status::status`: rejected before it started.
pub const STATUS_INVALID: c_int = 2;
/// `transfer_status::status`: canceled.
pub const STATUS_CANCELED: c_int = 3;
/// `transfer_status::status`: done, every byte moved.
pub const STATUS_COMPLETED: c_int = 4;
/// `transfer_status::status`: timed out.
pub const STATUS_TIMEOUT: c_int = 5;
/// `transfer_status::status`: failed.
pub const STATUS_FAILED: c_int = 6;

/// Upstream's `ERR_INVALID_ARGUMENT`: null pointers, bad lengths, dead handles.
const ERR_INVALID_ARGUMENT: c_int = -1;

/// One transfer (upstream `struct transfer_request`): `target_offset` is the absolute address in the target
/// segment's process, as upstream.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct transfer_request {
    /// `OPCODE_READ` or `OPCODE_WRITE`.
    pub opcode: c_int,
    /// Local address (registered memory).
    pub source: *mut c_void,
    /// Target segment from `openSegment`.
    pub target_id: segment_id_t,
    /// File id (file segments; unused here).
    pub file_id: file_id_t,
    /// Remote address.
    pub target_offset: u64,
    /// Bytes.
    pub length: u64,
}
/// Upstream's typedef of `struct transfer_request`.
pub type transfer_request_t = transfer_request;

/// A notification (upstream `struct notify_msg`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct notify_msg {
    /// Sender-chosen name.
    pub name: *mut c_char,
    /// Payload.
    pub msg: *mut c_char,
}
/// Upstream's typedef of `struct notify_msg`.
pub type notify_msg_t = notify_msg;

/// Status of one request (upstream `struct transfer_status`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct transfer_status {
    /// One of the `STATUS_*` values.
    pub status: c_int,
    /// Bytes moved.
    pub transferred_bytes: u64,
}
/// Upstream's typedef of `struct transfer_status`.
pub type transfer_status_t = transfer_status;

/// One buffer of `registerLocalMemoryBatch` (upstream `struct buffer_entry`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct buffer_entry {
    /// Start address.
    pub addr: *mut c_void,
    /// Bytes.
    pub length: usize,
}
/// Upstream's typedef of `struct buffer_entry`.
pub type buffer_entry_t = buffer_entry;

/// Upstream's `segment_desc.desc_.rdma`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct segment_desc_rdma {
    /// Start address.
    pub addr: *mut c_void,
    /// Bytes.
    pub size: u64,
    /// Location (`cpu:0`).
    pub location: *const c_char,
}

/// Upstream's `segment_desc.desc_.nvmeof`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct segment_desc_nvmeof {
    /// Backing file.
    pub file_path: *const c_char,
    /// NVMe-oF subsystem.
    pub subsystem_name: *const c_char,
    /// Fabric protocol.
    pub proto: *const c_char,
    /// Target IP.
    pub ip: *const c_char,
    /// Target port.
    pub port: u64,
}

/// The union inside upstream's `segment_desc`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union segment_desc_union {
    /// RDMA view.
    pub rdma: segment_desc_rdma,
    /// NVMe-oF view.
    pub nvmeof: segment_desc_nvmeof,
}

/// Upstream's `struct segment_desc` (same layout; no function of the header takes it).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct segment_desc {
    /// RDMA / NVMe-oF.
    pub r#type: c_int,
    /// The description.
    pub desc_: segment_desc_union,
}
/// Upstream's typedef of `struct segment_desc`.
pub type segment_desc_t = segment_desc;

/// How the engine will start (upstream's `createTransferEngine` arguments).
struct Plan {
    config: EngineConfig,
}

/// One C engine handle: the engine once started, segments opened through it, notifications owed.
pub(crate) struct CEngine {
    plan: Plan,
    engine: OnceLock<TransferEngine>,
    start_lock: Mutex<()>,
    opened: Mutex<Vec<SegmentHandle>>,
    /// Notifications to send when a batch completes (upstream sends them when the status is polled).
    owed: Mutex<HashMap<BatchId, (SegmentHandle, Notification)>>,
}

static ENGINES: Table<CEngine> = Table::new();

impl CEngine {
    /// The engine, started with `protocol` (or the config's default transports) when it is not running yet.
    fn start(&self, protocol: Option<&str>) -> Result<&TransferEngine> {
        if let Some(e) = self.engine.get() {
            return Ok(e);
        }
        let _once = self.start_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = self.engine.get() {
            return Ok(e);
        }
        let mut config = self.plan.config.clone();
        if let Some(p) = protocol {
            mooncake::registry::transport(p)?;
            config = config.with_protocols([p]);
        }
        let engine = TransferEngine::new(config)?;
        Ok(self.engine.get_or_init(|| engine))
    }

    fn running(&self) -> Result<&TransferEngine> {
        self.start(None)
    }
}

/// The running Rust engine behind a C handle (for benchmarks comparing a C call with the Rust call it wraps).
/// Not part of the C ABI.
#[doc(hidden)]
pub fn rust_engine(engine: transfer_engine_t) -> Option<TransferEngine> {
    lookup(engine).and_then(|c| c.engine.get().cloned())
}

fn lookup(engine: transfer_engine_t) -> Option<Arc<CEngine>> {
    ENGINES.get(engine as u64)
}

/// Runs `f` on the live engine behind `engine`: `-1` for a dead handle, the error's upstream code on failure.
fn with_engine(engine: transfer_engine_t, f: impl FnOnce(&CEngine) -> Result<c_int>) -> c_int {
    guard(ERR_INVALID_ARGUMENT, || match lookup(engine) {
        Some(e) => f(&e).unwrap_or_else(|err| err.code()),
        None => ERR_INVALID_ARGUMENT,
    })
}

fn invalid(what: &str) -> Error {
    Error::InvalidArgument(what.to_string())
}

/// Creates an engine handle (upstream `createTransferEngine`). `metadata_conn_string` is `P2PHANDSHAKE`,
/// `http://...`, `etcd://...` or `redis://...`; in P2P mode the segment name is `ip_or_host_name:<rpc port>`
/// (`rpc_port` 0 picks one). `NULL` for null or non-UTF-8 strings, or when `auto_discover != 0` and the engine
/// cannot start.
#[unsafe(no_mangle)]
pub extern "C" fn createTransferEngine(
    metadata_conn_string: *const c_char,
    local_server_name: *const c_char,
    ip_or_host_name: *const c_char,
    rpc_port: u64,
    auto_discover: c_int,
) -> transfer_engine_t {
    guard(std::ptr::null_mut(), || {
        mooncake::link_all();
        let (Some(metadata), Some(name)) = (str_arg(metadata_conn_string), str_arg(local_server_name)) else {
            return std::ptr::null_mut();
        };
        let host = if ip_or_host_name.is_null() { Some("") } else { str_arg(ip_or_host_name) };
        let Some(host) = host else { return std::ptr::null_mut() };
        let Ok(port) = u16::try_from(rpc_port) else { return std::ptr::null_mut() };
        let p2p = metadata.trim().eq_ignore_ascii_case("P2PHANDSHAKE");
        let server = if p2p && !host.is_empty() { host } else { name };
        if server.trim().is_empty() {
            return std::ptr::null_mut();
        }
        let mut config = EngineConfig::new(server, metadata);
        if port != 0 {
            config.rpc_port_range = (port, port);
        }
        if !p2p && !host.is_empty() && config.bind_host.is_none() {
            config.bind_host = Some(host.to_string());
        }
        let c = CEngine {
            plan: Plan { config },
            engine: OnceLock::new(),
            start_lock: Mutex::new(()),
            opened: Mutex::new(Vec::new()),
            owed: Mutex::new(HashMap::new()),
        };
        if auto_discover != 0 && c.running().is_err() {
            return std::ptr::null_mut();
        }
        ENGINES.insert(c).map_or(std::ptr::null_mut(), |h| h as transfer_engine_t)
    })
}

/// Writes this engine's segment name (`ip:port`) and a NUL into `buf_out[..buf_len]` (upstream
/// `getLocalIpAndPort`). `-1` when the buffer is null or too small.
#[unsafe(no_mangle)]
pub extern "C" fn getLocalIpAndPort(engine: transfer_engine_t, buf_out: *mut c_char, buf_len: usize) -> c_int {
    with_engine(engine, |c| {
        let e = c.running()?;
        if write_str(e.local_segment_name(), buf_out, buf_len) { Ok(0) } else { Err(invalid("buffer too small")) }
    })
}

static TRANSPORT_TOKEN: u8 = 0;

/// Installs transport `proto` (upstream `installTransport`; `args` is ignored, as upstream's TCP transport
/// ignores it). The first call starts the engine with `proto` as its primary transport; after that, only an
/// installed protocol succeeds. `NULL` for an unknown or unusable protocol, null arguments or a dead handle.
#[unsafe(no_mangle)]
pub extern "C" fn installTransport(
    engine: transfer_engine_t,
    proto: *const c_char,
    args: *mut *mut c_void,
) -> transport_t {
    let _ = args;
    guard(std::ptr::null_mut(), || {
        let (Some(c), Some(proto)) = (lookup(engine), str_arg(proto)) else { return std::ptr::null_mut() };
        match c.start(Some(proto)) {
            Ok(e) if e.transport(proto).is_some() => (&raw const TRANSPORT_TOKEN).cast_mut().cast(),
            _ => std::ptr::null_mut(),
        }
    })
}

/// Upstream `uninstallTransport`. Transports stay installed for the engine's life here: `0` for an installed
/// protocol (nothing changes), `-1` for one that is not.
#[unsafe(no_mangle)]
pub extern "C" fn uninstallTransport(engine: transfer_engine_t, proto: *const c_char) -> c_int {
    with_engine(engine, |c| {
        let proto = str_arg(proto).ok_or_else(|| invalid("proto"))?;
        match c.engine.get() {
            Some(e) if e.transport(proto).is_some() => Ok(0),
            _ => Err(invalid("transport not installed")),
        }
    })
}

fn open(engine: transfer_engine_t, segment_name: *const c_char, fresh: bool) -> segment_id_t {
    with_engine(engine, |c| {
        let name = str_arg(segment_name).ok_or_else(|| invalid("segment_name"))?;
        let e = c.running()?;
        let h = e.open_segment(name)?;
        if fresh {
            e.refresh_segment(h)?;
        }
        let id = segment_id_t::try_from(h).map_err(|_| invalid("segment handle does not fit segment_id_t"))?;
        let mut opened = c.opened.lock().unwrap_or_else(|p| p.into_inner());
        if !opened.contains(&h) {
            opened.push(h);
        }
        Ok(id)
    })
}

/// Opens segment `segment_name` (upstream `openSegment`): its id, or a negative code.
#[unsafe(no_mangle)]
pub extern "C" fn openSegment(engine: transfer_engine_t, segment_name: *const c_char) -> segment_id_t {
    open(engine, segment_name, false)
}

/// Opens segment `segment_name`, re-reading its descriptor (upstream `openSegmentNoCache`).
#[unsafe(no_mangle)]
pub extern "C" fn openSegmentNoCache(engine: transfer_engine_t, segment_name: *const c_char) -> segment_id_t {
    open(engine, segment_name, true)
}

/// Upstream `closeSegment`: `0` for an opened segment id (the engine keeps its cached descriptor, as
/// upstream's does), `-1` for an id this handle never opened.
#[unsafe(no_mangle)]
pub extern "C" fn closeSegment(engine: transfer_engine_t, segment_id: segment_id_t) -> c_int {
    with_engine(engine, |c| {
        let h = SegmentHandle::try_from(segment_id).map_err(|_| invalid("segment_id"))?;
        let mut opened = c.opened.lock().unwrap_or_else(|p| p.into_inner());
        let before = opened.len();
        opened.retain(|o| *o != h);
        if opened.len() < before { Ok(0) } else { Err(invalid("segment not opened")) }
    })
}

/// Upstream `removeLocalSegment` (drops a segment's metadata). Not supported here: the engine owns its keys and
/// removes them at destruction. Returns `-303` (unsupported) for a valid call, `-1` for bad arguments.
#[unsafe(no_mangle)]
pub extern "C" fn removeLocalSegment(engine: transfer_engine_t, segment_name: *const c_char) -> c_int {
    with_engine(engine, |_| {
        str_arg(segment_name).ok_or_else(|| invalid("segment_name"))?;
        Err(Error::unsupported("removeLocalSegment", "c-api"))
    })
}

/// Stops the engine and frees the handle (upstream `destroyTransferEngine`). A dead or null handle is ignored.
#[unsafe(no_mangle)]
pub extern "C" fn destroyTransferEngine(engine: transfer_engine_t) {
    guard((), || {
        if let Some(c) = ENGINES.remove(engine as u64)
            && let Some(e) = c.engine.get()
        {
            e.shutdown();
        }
    })
}

/// Registers `[addr, addr+length)` (upstream `registerLocalMemory`). The range must be memory of this process
/// that stays mapped until `unregisterLocalMemory` for it returns; peers write it while registered.
/// `remote_accessible` is accepted and ignored (every registration is published, as upstream's TCP does).
#[unsafe(no_mangle)]
pub extern "C" fn registerLocalMemory(
    engine: transfer_engine_t,
    addr: *mut c_void,
    length: usize,
    location: *const c_char,
    remote_accessible: c_int,
) -> c_int {
    let _ = remote_accessible;
    with_engine(engine, |c| {
        if addr.is_null() || length == 0 {
            return Err(invalid("null address or zero length"));
        }
        let location = if location.is_null() { Some("*") } else { str_arg(location) };
        let location = location.ok_or_else(|| invalid("location"))?;
        let e = c.running()?;
        // SAFETY: the C caller guarantees the range is mapped memory of this process that outlives its
        // registration (the documented contract of upstream's registerLocalMemory); the engine checks overlap
        // and wrap-around.
        unsafe { e.register_memory(addr as u64, length as u64, location) }?;
        Ok(0)
    })
}

/// Unregisters the registration starting at `addr` (upstream `unregisterLocalMemory`).
#[unsafe(no_mangle)]
pub extern "C" fn unregisterLocalMemory(engine: transfer_engine_t, addr: *mut c_void) -> c_int {
    with_engine(engine, |c| {
        if addr.is_null() {
            return Err(invalid("null address"));
        }
        c.running()?.unregister_memory(addr as u64)?;
        Ok(0)
    })
}

/// Registers `buffer_len` buffers at once (upstream `registerLocalMemoryBatch`), with the contract of
/// `registerLocalMemory` for each.
#[unsafe(no_mangle)]
pub extern "C" fn registerLocalMemoryBatch(
    engine: transfer_engine_t,
    buffer_list: *mut buffer_entry_t,
    buffer_len: usize,
    location: *const c_char,
) -> c_int {
    with_engine(engine, |c| {
        let list = slice_arg(buffer_list.cast_const(), buffer_len).ok_or_else(|| invalid("buffer_list"))?;
        if list.iter().any(|b| b.addr.is_null() || b.length == 0) {
            return Err(invalid("null address or zero length in buffer_list"));
        }
        let location = if location.is_null() { Some("*") } else { str_arg(location) };
        let location = location.ok_or_else(|| invalid("location"))?;
        let buffers: Vec<(u64, u64)> = list.iter().map(|b| (b.addr as u64, b.length as u64)).collect();
        let e = c.running()?;
        // SAFETY: as in registerLocalMemory, for every buffer (the caller's documented contract).
        unsafe { e.register_memory_batch(&buffers, location) }?;
        Ok(0)
    })
}

/// Unregisters `addr_len` registrations (upstream `unregisterLocalMemoryBatch`).
#[unsafe(no_mangle)]
pub extern "C" fn unregisterLocalMemoryBatch(
    engine: transfer_engine_t,
    addr_list: *mut *mut c_void,
    addr_len: usize,
) -> c_int {
    with_engine(engine, |c| {
        let list = slice_arg(addr_list.cast_const(), addr_len).ok_or_else(|| invalid("addr_list"))?;
        let addrs: Vec<u64> = list.iter().map(|a| *a as u64).collect();
        c.running()?.unregister_memory_batch(&addrs)?;
        Ok(0)
    })
}

/// Whether file buffers (`registerLocalFile`) are supported: never here (upstream `supportFileBuffer`).
#[unsafe(no_mangle)]
pub extern "C" fn supportFileBuffer(engine: transfer_engine_t) -> bool {
    let _ = engine;
    false
}

/// Upstream `registerLocalFile`: unsupported here (`-303`); `-1` for bad arguments.
#[unsafe(no_mangle)]
pub extern "C" fn registerLocalFile(
    engine: transfer_engine_t,
    path: *const c_char,
    size: usize,
    id: *mut file_id_t,
) -> c_int {
    let _ = size;
    with_engine(engine, |_| {
        if str_arg(path).is_none() || id.is_null() {
            return Err(invalid("path or id"));
        }
        Err(Error::unsupported("registerLocalFile", "c-api"))
    })
}

/// Upstream `unregisterLocalFile`: unsupported here (`-303`); `-1` for bad arguments.
#[unsafe(no_mangle)]
pub extern "C" fn unregisterLocalFile(engine: transfer_engine_t, path: *const c_char) -> c_int {
    with_engine(engine, |_| {
        str_arg(path).ok_or_else(|| invalid("path"))?;
        Err(Error::unsupported("unregisterLocalFile", "c-api"))
    })
}

/// Allocates a batch for up to `batch_size` requests (upstream `allocateBatchID`); `INVALID_BATCH` on failure.
#[unsafe(no_mangle)]
pub extern "C" fn allocateBatchID(engine: transfer_engine_t, batch_size: usize) -> batch_id_t {
    guard(INVALID_BATCH, || {
        let Some(c) = lookup(engine) else { return INVALID_BATCH };
        c.running().and_then(|e| e.allocate_batch(batch_size)).unwrap_or(INVALID_BATCH)
    })
}

/// The requests of a submission; `target_id` `LOCAL_SEGMENT` (0) names this engine's own segment, as upstream.
fn requests(e: &TransferEngine, entries: *mut transfer_request, count: usize) -> Result<Vec<TransferRequest>> {
    let list = slice_arg(entries.cast_const(), count).ok_or_else(|| invalid("entries"))?;
    if list.is_empty() {
        return Err(invalid("count is 0"));
    }
    list.iter()
        .map(|r| {
            let opcode = match r.opcode {
                OPCODE_READ => Opcode::Read,
                OPCODE_WRITE => Opcode::Write,
                _ => return Err(invalid("opcode")),
            };
            let target = match r.target_id {
                LOCAL_SEGMENT => e.open_segment(e.local_segment_name())?,
                id => SegmentHandle::try_from(id).map_err(|_| invalid("target_id"))?,
            };
            Ok(TransferRequest {
                opcode,
                local_addr: r.source as u64,
                target,
                remote_addr: r.target_offset,
                length: r.length,
            })
        })
        .collect()
}

/// Submits `count` requests into a batch (upstream `submitTransfer`). Every local range must lie in registered
/// memory; a bad request rejects the whole submission before anything starts.
#[unsafe(no_mangle)]
pub extern "C" fn submitTransfer(
    engine: transfer_engine_t,
    batch_id: batch_id_t,
    entries: *mut transfer_request,
    count: usize,
) -> c_int {
    with_engine(engine, |c| {
        let e = c.running()?;
        let reqs = requests(e, entries, count)?;
        e.submit_transfer(batch_id, &reqs)?;
        Ok(0)
    })
}

/// [`submitTransfer`], then `notify_msg` is sent to the first request's target segment once the batch has
/// completed (upstream `submitTransferWithNotify`: sent when `getTransferStatus` or `freeBatchID` sees it done).
#[unsafe(no_mangle)]
pub extern "C" fn submitTransferWithNotify(
    engine: transfer_engine_t,
    batch_id: batch_id_t,
    entries: *mut transfer_request,
    count: usize,
    notify_msg: notify_msg_t,
) -> c_int {
    with_engine(engine, |c| {
        let note = notification(&notify_msg)?;
        let e = c.running()?;
        let reqs = requests(e, entries, count)?;
        e.submit_transfer(batch_id, &reqs)?;
        c.owed.lock().unwrap_or_else(|p| p.into_inner()).insert(batch_id, (reqs[0].target, note));
        Ok(0)
    })
}

fn notification(m: &notify_msg) -> Result<Notification> {
    let name = str_arg(m.name).ok_or_else(|| invalid("notify_msg.name"))?;
    let message = str_arg(m.msg).ok_or_else(|| invalid("notify_msg.msg"))?;
    Ok(Notification { name: name.to_string(), message: message.to_string() })
}

/// Sends the notification owed for `batch_id` when the batch has completed.
fn settle(c: &CEngine, e: &TransferEngine, batch_id: BatchId) -> Result<()> {
    let mut owed = c.owed.lock().unwrap_or_else(|p| p.into_inner());
    if owed.is_empty() || !owed.contains_key(&batch_id) {
        return Ok(());
    }
    let status = e.batch_status(batch_id)?;
    if status.state != TransferState::Completed {
        if matches!(status.state, TransferState::Waiting | TransferState::Pending) {
            return Ok(());
        }
        owed.remove(&batch_id);
        return Ok(());
    }
    let Some((target, note)) = owed.remove(&batch_id) else { return Ok(()) };
    drop(owed);
    let name = e.segment(target)?.name.clone();
    e.send_notify(&name, note)
}

/// Messages received so far, oldest first (upstream `getNotifsFromEngine`): an array of `*size` messages
/// to free with `freeNotifsMsgBuf`, or `NULL` with `*size = 0` when there are none (or on error, `*size = -1`).
#[unsafe(no_mangle)]
pub extern "C" fn getNotifsFromEngine(engine: transfer_engine_t, size: *mut c_int) -> *mut notify_msg_t {
    guard(std::ptr::null_mut(), || {
        let set = |n: c_int| {
            if !size.is_null() {
                // SAFETY: non-null, and by contract `size` points at a writable int.
                unsafe { *size = n };
            }
        };
        let Some(e) = lookup(engine).filter(|_| !size.is_null()).and_then(|c| c.running().ok().cloned()) else {
            set(-1);
            return std::ptr::null_mut();
        };
        let notes = e.drain_notifications();
        if notes.is_empty() {
            set(0);
            return std::ptr::null_mut();
        }
        let Ok(n) = c_int::try_from(notes.len()) else {
            set(-1);
            return std::ptr::null_mut();
        };
        // SAFETY: plain allocation of `n` structs; checked for null below.
        let out = unsafe { libc::calloc(notes.len(), std::mem::size_of::<notify_msg_t>()) }.cast::<notify_msg_t>();
        if out.is_null() {
            set(-1);
            return std::ptr::null_mut();
        }
        for (i, note) in notes.iter().enumerate() {
            let m = notify_msg { name: c_string(&note.name), msg: c_string(&note.message) };
            // SAFETY: `out` holds `notes.len()` zeroed structs and `i < notes.len()`.
            unsafe { out.add(i).write(m) };
        }
        set(n);
        out
    })
}

/// A malloc'd NUL-terminated copy of `s` (interior NULs cut it short); null when out of memory.
fn c_string(s: &str) -> *mut c_char {
    let bytes = s.as_bytes();
    let len = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    // SAFETY: plain allocation of len + 1 bytes; checked for null.
    let p = unsafe { libc::malloc(len + 1) }.cast::<c_char>();
    if !p.is_null() {
        // SAFETY: `p` holds len + 1 bytes and `bytes[..len]` is readable.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.cast::<u8>(), len);
            *p.add(len) = 0;
        }
    }
    p
}

/// Frees what `getNotifsFromEngine` returned (upstream `freeNotifsMsgBuf`). `msg` must be exactly such an array
/// with its `size`; `NULL` is accepted. `0`, or `-1` for a negative size.
#[unsafe(no_mangle)]
pub extern "C" fn freeNotifsMsgBuf(msg: *mut notify_msg_t, size: c_int) -> c_int {
    guard(ERR_INVALID_ARGUMENT, || {
        if msg.is_null() {
            return 0;
        }
        let Ok(n) = usize::try_from(size) else { return ERR_INVALID_ARGUMENT };
        for i in 0..n {
            // SAFETY: by contract `msg` is an array of `size` messages from getNotifsFromEngine, whose strings
            // were malloc'd there.
            unsafe {
                let m = msg.add(i).read();
                libc::free(m.name.cast());
                libc::free(m.msg.cast());
            }
        }
        // SAFETY: the array itself was calloc'd by getNotifsFromEngine.
        unsafe { libc::free(msg.cast()) };
        0
    })
}

/// Sends `notify_msg` to the opened segment `target_id` (upstream `genNotifyInEngine`).
#[unsafe(no_mangle)]
pub extern "C" fn genNotifyInEngine(engine: transfer_engine_t, target_id: u64, notify_msg: notify_msg_t) -> c_int {
    with_engine(engine, |c| {
        let note = notification(&notify_msg)?;
        let e = c.running()?;
        let name = e.segment(target_id)?.name.clone();
        e.send_notify(&name, note)?;
        Ok(0)
    })
}

/// Status of request `task_id` of a batch (upstream `getTransferStatus`), written to `*status`.
#[unsafe(no_mangle)]
pub extern "C" fn getTransferStatus(
    engine: transfer_engine_t,
    batch_id: batch_id_t,
    task_id: usize,
    status: *mut transfer_status,
) -> c_int {
    with_engine(engine, |c| {
        let out = slice_out(status, 1).ok_or_else(|| invalid("status"))?;
        let e = c.running()?;
        let s = e.transfer_status(batch_id, task_id)?;
        out[0] = transfer_status { status: s.state as c_int, transferred_bytes: s.transferred_bytes };
        if s.state == TransferState::Completed {
            settle(c, e, batch_id)?;
        }
        Ok(0)
    })
}

/// Frees a batch (upstream `freeBatchID`); `-4` (batch busy) while requests are in flight.
#[unsafe(no_mangle)]
pub extern "C" fn freeBatchID(engine: transfer_engine_t, batch_id: batch_id_t) -> c_int {
    with_engine(engine, |c| {
        let e = c.running()?;
        settle(c, e, batch_id)?;
        e.free_batch(batch_id)?;
        c.owed.lock().unwrap_or_else(|p| p.into_inner()).remove(&batch_id);
        Ok(0)
    })
}

/// Re-reads the descriptors of every segment opened through this handle (upstream `syncSegmentCache`).
#[unsafe(no_mangle)]
pub extern "C" fn syncSegmentCache(engine: transfer_engine_t) -> c_int {
    with_engine(engine, |c| {
        let e = c.running()?;
        let opened = c.opened.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for h in opened {
            e.refresh_segment(h)?;
        }
        Ok(0)
    })
}

/// Upstream `discoverTopology` (newer upstream sources): the engine discovers its topology when it starts, so
/// this only checks the handle: `0`, or `-1` for a dead handle.
#[unsafe(no_mangle)]
pub extern "C" fn discoverTopology(engine: transfer_engine_t) -> c_int {
    with_engine(engine, |c| c.running().map(|_| 0))
}

/// Upstream `warmupEfaSegment` (newer upstream sources): opens `segment_name` ahead of the first transfer when
/// the `efa` transport is installed; `0` without it, as upstream.
#[unsafe(no_mangle)]
pub extern "C" fn warmupEfaSegment(engine: transfer_engine_t, segment_name: *const c_char) -> c_int {
    with_engine(engine, |c| {
        let e = c.running()?;
        if e.transport("efa").is_none() {
            return Ok(0);
        }
        let name = str_arg(segment_name).ok_or_else(|| invalid("segment_name"))?;
        e.open_segment(name).map(|_| 0)
    })
}

/// Upstream `enableGracefulShutdown` (newer upstream sources): destruction here always waits for in-flight
/// remote accesses before unregistering memory, so this is a no-op.
#[unsafe(no_mangle)]
pub extern "C" fn enableGracefulShutdown(engine: transfer_engine_t) {
    let _ = engine;
}

/// Upstream `showLinks` (newer upstream sources): the installed transports and the opened segments, as JSON
/// (`json != 0`) or one line of text, written with a NUL into `buf_out[..buf_len]`; `-1` when it does not fit.
#[unsafe(no_mangle)]
pub extern "C" fn showLinks(engine: transfer_engine_t, buf_out: *mut c_char, buf_len: usize, json: c_int) -> c_int {
    with_engine(engine, |c| {
        if buf_out.is_null() || buf_len == 0 {
            return Err(invalid("buf_out"));
        }
        let e = c.running()?;
        let opened = c.opened.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let names: Vec<String> = opened.iter().filter_map(|h| e.segment(*h).ok().map(|s| s.name.clone())).collect();
        let protocols = e.protocols();
        let text = if json != 0 {
            let quote = |v: &[String]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(",");
            format!(
                "{{\"local\":{:?},\"transports\":[{}],\"segments\":[{}]}}",
                e.local_segment_name(),
                quote(&protocols),
                quote(&names)
            )
        } else {
            format!("local {} transports {} segments {}", e.local_segment_name(), protocols.join(","), names.join(","))
        };
        if write_str(&text, buf_out, buf_len) { Ok(0) } else { Err(invalid("buffer too small")) }
    })
}
