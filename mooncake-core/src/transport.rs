//! The `Transport` trait: moves bytes between local memory and a remote segment.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::capabilities::Capabilities;
use crate::completion::Completion;
use crate::descriptor::{BufferDesc, SegmentDescriptor};
use crate::device::MemoryDevice;
use crate::error::{Error, Result};
use crate::memory::{LocalRange, RegionGuard, RegionTable};
use crate::types::{Opcode, SegmentHandle};

/// Reports from transports back to the engine.
pub trait PeerEvents: Send + Sync + 'static {
    /// Connecting to or talking with `segment_name` failed at the connection level: the engine
    /// re-reads its descriptor before the next transfer (it may have restarted elsewhere).
    fn peer_failed(&self, segment_name: &str);
}

/// How a transport reaches other engines' handshake sockets (docs/wire-formats.md section 3) by segment name,
/// whatever the metadata mode: in P2P mode the name is the socket address, in metadata mode the
/// engine resolves it through the segment's `rpc_meta` key.
#[async_trait]
pub trait PeerHandshake: Send + Sync + 'static {
    /// Sends connection handshake `request` (a type-0 frame, e.g. RDMA queue-pair numbers) to
    /// segment `segment` and returns its reply.
    async fn connect(&self, segment: &str, request: &Value) -> Result<Value>;

    /// The segment's current descriptor, read from the metadata service (or asked of the peer).
    async fn descriptor(&self, segment: &str) -> Result<SegmentDescriptor>;
}

/// The [`PeerHandshake`] of a transport started outside an engine (tools, unit tests): every
/// request fails with `Unavailable`, naming what is missing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPeerHandshake;

#[async_trait]
impl PeerHandshake for NoPeerHandshake {
    async fn connect(&self, segment: &str, _request: &Value) -> Result<Value> {
        Err(Error::unavailable(format!(
            "no handshake channel to reach segment {segment:?}: this transport was started without an engine"
        )))
    }

    async fn descriptor(&self, segment: &str) -> Result<SegmentDescriptor> {
        Err(Error::unavailable(format!(
            "cannot read the descriptor of segment {segment:?}: this transport was started without an engine"
        )))
    }
}

/// What the engine hands a transport when it starts.
#[derive(Clone)]
pub struct TransportContext {
    /// This engine's segment name.
    pub local_name: String,
    /// Host or address every listener must bind (never widened to the wildcard).
    pub bind_host: String,
    /// Locally registered memory: every remote access must be checked against it.
    pub regions: Arc<RegionTable>,
    /// The engine's runtime; spawn I/O tasks here.
    pub runtime: tokio::runtime::Handle,
    /// Where to report failed peers.
    pub peer_events: Arc<dyn PeerEvents>,
    /// How to reach peers' handshake sockets by segment name.
    pub peers: Arc<dyn PeerHandshake>,
    /// The engine's memory devices (for dmabuf export of device memory, staging copies).
    pub devices: Vec<Arc<dyn MemoryDevice>>,
}

impl std::fmt::Debug for TransportContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportContext")
            .field("local_name", &self.local_name)
            .field("bind_host", &self.bind_host)
            .finish_non_exhaustive()
    }
}

/// Options for creating a transport (from the engine config; backends may also read `MC_*` env).
#[derive(Debug, Clone, Default)]
pub struct BackendConfig {
    /// Key/value options, e.g. `{"lanes": "4"}`.
    pub options: BTreeMap<String, String>,
}

impl BackendConfig {
    /// Option `key`, else environment variable `env`, parsed.
    pub fn get<T: std::str::FromStr>(&self, key: &str, env: &str) -> Option<T> {
        self.options.get(key).cloned().or_else(|| std::env::var(env).ok()).and_then(|v| v.trim().parse().ok())
    }
}

/// A remote segment as transports see it: the descriptor plus where its host is.
#[derive(Debug, Clone)]
pub struct RemoteSegment {
    /// Engine handle of the segment.
    pub handle: SegmentHandle,
    /// Segment name.
    pub name: String,
    /// Host (name or IP) of the segment: its `rpc_meta` host, else the host part of its name. A
    /// transport whose descriptor section publishes a data host of its own may prefer that.
    pub host: String,
    /// The published descriptor.
    pub descriptor: SegmentDescriptor,
}

/// One request as handed to a transport: the remote address is absolute and already validated (remote range
/// inside one published buffer); the local side comes with the proof that it may be touched.
#[derive(Debug)]
pub struct TransferTask {
    /// Read or write.
    pub opcode: Opcode,
    /// The local range (address and length, never zero): registered memory whose region it keeps registered
    /// until the task is dropped, or a range the caller of an `unsafe` entry point vouched for. Transports
    /// turn it into bytes only through `mooncake-raw`.
    pub local: LocalRange,
    /// Absolute address in the target process.
    pub remote_addr: u64,
    /// Finish exactly once with the bytes moved or a typed error.
    pub completion: Completion,
}

/// One request of [`Transport::transfer_blocking_batch`]: as for [`TransferTask`]; the opcode is the
/// batch's.
#[derive(Debug, Clone)]
pub struct BlockingRequest {
    /// The local range, with its proof (see [`TransferTask::local`]).
    pub local: LocalRange,
    /// Absolute address in the target process.
    pub remote_addr: u64,
}

impl BlockingRequest {
    /// Bytes to move (> 0).
    pub fn length(&self) -> u64 {
        self.local.len()
    }
}

impl TransferTask {
    /// Bytes to move (> 0).
    pub fn length(&self) -> u64 {
        self.local.len()
    }

    /// Address in this process.
    pub fn local_addr(&self) -> u64 {
        self.local.addr()
    }

    /// Finishes every task with `error` (a submit that cannot start any of them).
    pub fn fail_all(tasks: Vec<TransferTask>, error: &Error) {
        for t in tasks {
            t.completion.finish(Err(error.clone()));
        }
    }
}

/// A way to move bytes: tcp, rdma, shm, efa, nvlink, cxl, nvmeof, ...
///
/// Contract:
/// - `submit` never blocks and never panics on peer input; every task is finished exactly once,
///   with a typed error when the peer is gone (no hang), including tasks queued behind a failure.
/// - Remote peers name absolute addresses: a serving transport checks every access against
///   [`TransportContext::regions`] before touching memory and holds the returned guard meanwhile.
/// - Local ranges come as [`LocalRange`]s: inside registered memory (the engine's safe calls always
///   check), or vouched for by the caller of an `unsafe` entry point (the Python binding, for upstream's
///   unregistered TCP buffers). A transport that needs registered local memory
///   ([`Capabilities::requires_local_registration`]) refuses a vouched range that is not registered with
///   `AddressNotRegistered` ([`LocalRange::registered_in`]). Bytes are touched only through `mooncake-raw`,
///   which never dereferences memory of a device the CPU cannot read: a transport that moves bytes with the
///   CPU stages such memory through its device, on both the local and the serving side.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// The protocol string of docs/wire-formats.md section 2 (`"tcp"`).
    fn name(&self) -> &str;

    /// Flags, limits and cost model.
    fn capabilities(&self) -> &Capabilities;

    /// Binds listeners and starts serving. Called once before anything else.
    async fn start(&self, ctx: &TransportContext) -> Result<()>;

    /// A buffer was registered; add what peers need (keys, IPC handles) to its descriptor entry,
    /// as this transport's per-buffer [`Section`](crate::Section). A transport that lets peers or a NIC reach
    /// the memory without a check at access time (an RDMA key, a shared registration table) keeps a clone of
    /// `region` until [`Transport::unregister_memory`], so the region cannot be removed (and its memory
    /// freed) while that access is possible.
    fn register_memory(&self, _region: &RegionGuard, _desc: &mut BufferDesc) -> Result<()> {
        Ok(())
    }

    /// A buffer is being unregistered: stop peers' access to it and drop what was kept of it.
    fn unregister_memory(&self, _region: &RegionGuard) -> Result<()> {
        Ok(())
    }

    /// Adds this transport's top-level fields (ports, device lists) to the local descriptor, as
    /// its top-level [`Section`](crate::Section).
    fn describe(&self, desc: &mut SegmentDescriptor);

    /// Whether this transport can reach `target` at all (same host for shm, matching NICs, ...).
    fn can_reach(&self, _target: &RemoteSegment) -> bool {
        true
    }

    /// Whether this transport can reach the published buffer `buffer` of `target` (e.g. a GPU IPC transport
    /// only buffers published with an IPC handle). The engine routes a request only to transports that can.
    fn can_reach_buffer(&self, _target: &RemoteSegment, _buffer: &BufferDesc) -> bool {
        true
    }

    /// Establishes connections ahead of the first transfer (optional warm-up).
    async fn connect(&self, _target: &RemoteSegment) -> Result<()> {
        Ok(())
    }

    /// Starts the tasks; each finishes through its completion.
    fn submit(&self, target: &Arc<RemoteSegment>, tasks: Vec<TransferTask>);

    /// Runs one request on the calling thread and blocks until it is done, when the transport has
    /// a faster path for that than [`Transport::submit`] (e.g. small requests, avoiding two thread
    /// hand-offs). `None` = no such path for this request: the engine submits it normally.
    fn transfer_blocking(
        &self,
        _target: &Arc<RemoteSegment>,
        _opcode: Opcode,
        _local: &LocalRange,
        _remote_addr: u64,
        _timeout: std::time::Duration,
    ) -> Option<Result<u64>> {
        None
    }

    /// Runs several requests with one opcode to one target on the calling thread and blocks until all are done,
    /// when the transport has a faster path for that than [`Transport::submit`] (e.g. pipelining small requests
    /// on one connection the caller drives itself). One result per request, in order: the bytes moved, or that
    /// request's error. `None` = no such path for these requests: the engine submits them normally.
    fn transfer_blocking_batch(
        &self,
        _target: &Arc<RemoteSegment>,
        _opcode: Opcode,
        _requests: &[BlockingRequest],
        _timeout: std::time::Duration,
    ) -> Option<Vec<Result<u64>>> {
        None
    }

    /// Drops cached connections to a segment (its descriptor changed or it restarted).
    fn forget_peer(&self, _segment_name: &str) {}

    /// Handles a connection-handshake frame (docs/wire-formats.md section 3, type 0) addressed to this
    /// transport, e.g. an RDMA queue-pair exchange. `None` = not mine.
    async fn handle_handshake(&self, _request: &Value) -> Option<Result<Value>> {
        None
    }

    /// Stops listeners and fails whatever is still in flight.
    async fn shutdown(&self);
}
