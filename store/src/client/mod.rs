//! The store client: contributes memory to the store and moves object bytes with the TransferEngine.
//!
//! [`StoreClient::setup`] connects to the master, starts a [`TransferEngine`], allocates and registers the
//! global segment (mounted on the master under the engine's segment name) and a staging buffer, and starts a
//! ping thread. Every call is synchronous (made from user threads), costs one master round trip per call or
//! batch (two for writes: `PutStart`, then `PutEnd`/`PutRevoke`) and moves all bytes of the call in one
//! engine batch. Batch calls return one result per key and never fail as a whole.
//!
//! ```no_run
//! use mooncake_store::client::{ClientConfig, StoreClient};
//! use mooncake_store::types::ReplicateConfig;
//! # fn main() -> mooncake_store::Result<()> {
//! // (link the backends first, e.g. `mooncake::link_all()` from the `mooncake` facade)
//! let client = StoreClient::setup(ClientConfig {
//!     local_hostname: "127.0.0.1".into(),
//!     master_server_addr: "127.0.0.1:50051".into(),
//!     global_segment_size: 64 << 20,
//!     local_buffer_size: 16 << 20,
//!     ..Default::default()
//! })?;
//! client.put("greeting", b"hello", &ReplicateConfig::default())?;
//! assert_eq!(client.get("greeting")?, b"hello");
//! client.close()?;
//! # Ok(()) }
//! ```
//!
//! Zero-copy calls (`put_from`, `get_into`, ...) take addresses inside buffers registered with
//! [`StoreClient::register_buffer`]; anything else (null, zero length, unregistered) is `InvalidParams`
//! before any memory is touched. The bytes API stages remote transfers through the registered staging
//! buffer (or a temporary registration when it is too small); replicas on our own segment are copied with
//! memcpy. After [`StoreClient::close`] every call fails with `UnavailableInCurrentStatus`.
//!
//! Calls block the calling thread (polling the master's reply on it, then waiting for the engine batch); make
//! them from ordinary threads, never from async runtime threads (the engine's, or a tokio worker).

mod config;
mod errors;
mod lifecycle;
mod local_copy;
mod master;
mod read;
mod segments;
mod session;
mod staging;
mod tasks;
mod write;

use std::sync::Arc;
use std::time::Duration;

use mooncake_core::TransferEngine;

pub use config::ClientConfig;
pub use lifecycle::{CXL_STORE_AREA, CXL_STORE_AREA_ENV, HEALTH_MASTER_UNREACHABLE, HEALTH_NOT_INITIALIZED, HEALTH_OK};
pub use session::Ranges;

use lifecycle::Inner;
use master::{per_key, wrong_kind};
use read::Dest;
use write::Source;

use crate::error::{Error, Result};
use crate::protocol::{Request, Response};
use crate::types::{ClientId, ErrorCode, ReplicaDescriptor, ReplicateConfig};
use crate::types::{TaskId, TaskInfo};

/// A store client. Cheap to clone (clones share one client); `Send + Sync`. The last clone dropped closes it.
#[derive(Clone)]
pub struct StoreClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for StoreClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreClient")
            .field("id", &self.inner.id)
            .field("segment", &self.inner.endpoint)
            .field("master", &self.inner.config.master_server_addr)
            .finish()
    }
}

/// Every key gets `e`.
fn all<T>(n: usize, e: impl Into<Error>) -> Vec<Result<T>> {
    let e = e.into();
    (0..n).map(|_| Err(e.clone())).collect()
}

impl StoreClient {
    // ---- lifecycle ---------------------------------------------------------------------------

    /// Connects to the master (retrying until `setup_timeout`: an absent master gives `RpcFail` within it),
    /// starts the engine, allocates, registers and mounts the global segment, allocates the staging buffer and
    /// starts the ping thread. Engine failures give `TransferFail`, a bad config `InvalidParams`.
    pub fn setup(config: ClientConfig) -> Result<StoreClient> {
        Inner::setup(config, None).map(|inner| StoreClient { inner })
    }

    /// [`StoreClient::setup`] on an engine the caller already runs (upstream's `setup(..., engine=...)`: serving
    /// frameworks share one engine between the store and their own transfers). The segment and staging buffer
    /// are registered with that engine and reached through its transports under its segment name; the config's
    /// `local_hostname` names the host only, and its `metadata_server`, `protocol`, `device_name` and
    /// `same_host_transports` are not applied (the engine has its own). `close` unregisters what the client
    /// registered and leaves the engine running.
    pub fn with_engine(config: ClientConfig, engine: TransferEngine) -> Result<StoreClient> {
        Inner::setup(config, Some(engine)).map(|inner| StoreClient { inner })
    }

    /// Unmounts the segment, unregisters and frees memory, stops the ping thread and the engine. Idempotent;
    /// waits for calls in flight. Later calls fail with `UnavailableInCurrentStatus`.
    pub fn close(&self) -> Result<()> {
        self.inner.close();
        Ok(())
    }

    /// [`HEALTH_OK`] (0) when the master answered the last ping, [`HEALTH_NOT_INITIALIZED`] (1) after close,
    /// [`HEALTH_MASTER_UNREACHABLE`] (2) when it did not. Pings afresh if the last ping is older than two ping
    /// intervals.
    pub fn health(&self) -> i32 {
        self.inner.health()
    }

    /// This client's transfer-engine segment name (`host:port` in P2P mode), also the name of its segment.
    pub fn hostname(&self) -> &str {
        &self.inner.endpoint
    }

    /// Waits up to `timeout` until this client's segment is faulted in (setup starts that on a background
    /// thread; until it ends, the first writes into the segment pay page faults and the thread takes a core).
    /// True when it has ended, or when the client contributes no segment.
    pub fn wait_segment_prefaulted(&self, timeout: Duration) -> bool {
        self.inner.prefault.wait(timeout)
    }

    /// The client's id at the master.
    pub fn client_id(&self) -> ClientId {
        self.inner.id
    }

    /// The configuration the client was set up with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The client's transfer engine (shut down after close).
    pub fn engine(&self) -> &TransferEngine {
        &self.inner.engine
    }

    // ---- registration ------------------------------------------------------------------------

    /// Registers `[ptr, ptr+len)` of this process with the engine for the zero-copy calls (and for peers). Null,
    /// zero length, wrap-around or overlap with another registration: `InvalidParams`.
    ///
    /// # Safety
    /// As for `TransferEngine::register_memory`: the range must be host memory of this process, mapped
    /// readable and writable, not freed until [`StoreClient::unregister_buffer`] for it returns `Ok`, and
    /// reached only by copy while registered (peers and the zero-copy calls write it).
    #[allow(unsafe_code)]
    pub unsafe fn register_buffer(&self, ptr: u64, len: u64) -> Result<()> {
        let _open = self.inner.op()?;
        if ptr == 0 || len == 0 || ptr.checked_add(len).is_none() {
            return Err(ErrorCode::InvalidParams.into());
        }
        // SAFETY: this function's contract is the engine's registration contract.
        unsafe { self.inner.engine.register_memory(ptr, len, "*") }.map_err(|e| register_error(ptr, len, e))
    }

    /// [`StoreClient::register_buffer`] for memory `device` allocated (a dummy client's pool): the engine holds
    /// the allocation while it is registered, so no `unsafe` is needed.
    pub(crate) fn register_device_buffer(
        &self,
        device: &std::sync::Arc<dyn mooncake_core::MemoryDevice>,
        memory: &mooncake_core::Allocation,
    ) -> Result<()> {
        let _open = self.inner.op()?;
        self.inner
            .engine
            .register_allocation(device, memory, "*")
            .map_err(|e| register_error(memory.addr, memory.len, e))
    }

    /// Unregisters a buffer registered with [`StoreClient::register_buffer`] (waits for transfers touching it).
    /// An address that starts no registration, or the client's own memory: `InvalidParams`.
    pub fn unregister_buffer(&self, ptr: u64) -> Result<()> {
        let _open = self.inner.op()?;
        let own =
            self.inner.segment.iter().map(|s| s.memory.addr).chain(self.inner.staging.iter().map(|s| s.memory.addr));
        if ptr == 0 || own.into_iter().any(|a| a == ptr) {
            return Err(ErrorCode::InvalidParams.into());
        }
        self.inner.engine.unregister_memory(ptr).map_err(|e| match e {
            mooncake_core::Error::AddressNotRegistered { .. } => {
                errors::engine_as(ErrorCode::InvalidParams, &format!("unregister_buffer({ptr:#x}) refused"), &e)
            }
            e => errors::engine("unregister_buffer failed", &e),
        })
    }

    // ---- bytes API ---------------------------------------------------------------------------

    /// Stores `value` under `key` (put-if-absent: an existing key gives `ObjectAlreadyExists`).
    pub fn put(&self, key: &str, value: &[u8], config: &ReplicateConfig) -> Result<()> {
        self.put_parts(key, &[value], config)
    }

    /// Stores the concatenation of `parts` under `key`.
    pub fn put_parts(&self, key: &str, parts: &[&[u8]], config: &ReplicateConfig) -> Result<()> {
        let _open = self.inner.op()?;
        one(self.inner.write_many(&[key], vec![Source::Bytes(parts.to_vec())], config, false))
    }

    /// Stores `values[i]` under `keys[i]`; one result per key (mismatched lengths: all `InvalidParams`).
    pub fn put_batch<K: AsRef<str>>(&self, keys: &[K], values: &[&[u8]], config: &ReplicateConfig) -> Vec<Result<()>> {
        self.bytes_batch(keys, values, config, false)
    }

    /// Stores `value` under `key`, replacing an existing value (readers keep the old bytes until the new ones
    /// are complete).
    pub fn upsert(&self, key: &str, value: &[u8], config: &ReplicateConfig) -> Result<()> {
        let _open = self.inner.op()?;
        one(self.inner.write_many(&[key], vec![Source::Bytes(vec![value])], config, true))
    }

    /// [`StoreClient::upsert`] for many keys; one result per key.
    pub fn upsert_batch<K: AsRef<str>>(
        &self,
        keys: &[K],
        values: &[&[u8]],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        self.bytes_batch(keys, values, config, true)
    }

    fn bytes_batch<K: AsRef<str>>(
        &self,
        keys: &[K],
        values: &[&[u8]],
        config: &ReplicateConfig,
        upsert: bool,
    ) -> Vec<Result<()>> {
        let Ok(_open) = self.inner.op() else { return all(keys.len(), ErrorCode::UnavailableInCurrentStatus) };
        if keys.len() != values.len() {
            return all(keys.len(), ErrorCode::InvalidParams);
        }
        let sources = values.iter().map(|v| Source::Bytes(vec![*v])).collect();
        self.inner.write_many(keys, sources, config, upsert)
    }

    /// The value of `key`; `ObjectNotFound` when absent.
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        let _open = self.inner.op()?;
        let r = one(self.inner.read_many(&[key], vec![Dest::Owned]))?;
        Ok(r.1.unwrap_or_default())
    }

    /// The values of `keys`; one result per key.
    pub fn get_batch<K: AsRef<str>>(&self, keys: &[K]) -> Vec<Result<Vec<u8>>> {
        let Ok(_open) = self.inner.op() else { return all(keys.len(), ErrorCode::UnavailableInCurrentStatus) };
        let dests = keys.iter().map(|_| Dest::Owned).collect();
        self.inner.read_many(keys, dests).into_iter().map(|r| r.map(|(_, v)| v.unwrap_or_default())).collect()
    }

    // ---- zero-copy API -----------------------------------------------------------------------

    /// Stores the `len` bytes at `ptr` (inside a registered buffer) under `key`.
    pub fn put_from(&self, key: &str, ptr: u64, len: u64, config: &ReplicateConfig) -> Result<()> {
        let _open = self.inner.op()?;
        one(self.inner.write_many(&[key], vec![Source::Raw(vec![(ptr, len)])], config, false))
    }

    /// [`StoreClient::put_from`], replacing an existing value.
    pub fn upsert_from(&self, key: &str, ptr: u64, len: u64, config: &ReplicateConfig) -> Result<()> {
        let _open = self.inner.op()?;
        one(self.inner.write_many(&[key], vec![Source::Raw(vec![(ptr, len)])], config, true))
    }

    /// Reads `key` into `[ptr, ptr+len)` (inside a registered buffer); returns the object's size (at most
    /// `len`). A larger object gives `BufferOverflow` without reading.
    pub fn get_into(&self, key: &str, ptr: u64, len: u64) -> Result<u64> {
        let _open = self.inner.op()?;
        one(self.inner.read_many(&[key], vec![Dest::Raw(vec![(ptr, len)])])).map(|r| r.0)
    }

    /// [`StoreClient::put_from`] for many keys; one result per key.
    pub fn batch_put_from<K: AsRef<str>>(
        &self,
        keys: &[K],
        ptrs: &[u64],
        lens: &[u64],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        self.raw_write_batch(keys, ptrs, lens, config, false)
    }

    /// [`StoreClient::upsert_from`] for many keys; one result per key.
    pub fn batch_upsert_from<K: AsRef<str>>(
        &self,
        keys: &[K],
        ptrs: &[u64],
        lens: &[u64],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        self.raw_write_batch(keys, ptrs, lens, config, true)
    }

    fn raw_write_batch<K: AsRef<str>>(
        &self,
        keys: &[K],
        ptrs: &[u64],
        lens: &[u64],
        config: &ReplicateConfig,
        upsert: bool,
    ) -> Vec<Result<()>> {
        let Ok(_open) = self.inner.op() else { return all(keys.len(), ErrorCode::UnavailableInCurrentStatus) };
        if keys.len() != ptrs.len() || keys.len() != lens.len() {
            return all(keys.len(), ErrorCode::InvalidParams);
        }
        let sources = ptrs.iter().zip(lens).map(|(&p, &l)| Source::Raw(vec![(p, l)])).collect();
        self.inner.write_many(keys, sources, config, upsert)
    }

    /// [`StoreClient::get_into`] for many keys; one result per key (the byte count read).
    pub fn batch_get_into<K: AsRef<str>>(&self, keys: &[K], ptrs: &[u64], lens: &[u64]) -> Vec<Result<u64>> {
        let Ok(_open) = self.inner.op() else { return all(keys.len(), ErrorCode::UnavailableInCurrentStatus) };
        if keys.len() != ptrs.len() || keys.len() != lens.len() {
            return all(keys.len(), ErrorCode::InvalidParams);
        }
        let dests = ptrs.iter().zip(lens).map(|(&p, &l)| Dest::Raw(vec![(p, l)])).collect();
        self.inner.read_many(keys, dests).into_iter().map(|r| r.map(|(n, _)| n)).collect()
    }

    /// Stores, for each key, the concatenation of its buffers (`ptr_lists[i][j]`, `len_lists[i][j]`, all inside
    /// registered buffers); one result per key.
    pub fn batch_put_from_multi_buffers<K: AsRef<str>, P: AsRef<[u64]>, L: AsRef<[u64]>>(
        &self,
        keys: &[K],
        ptr_lists: &[P],
        len_lists: &[L],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        let Ok(_open) = self.inner.op() else { return all(keys.len(), ErrorCode::UnavailableInCurrentStatus) };
        let Some(parts) = zip_parts(keys.len(), ptr_lists, len_lists) else {
            return all(keys.len(), ErrorCode::InvalidParams);
        };
        let sources = parts.into_iter().map(Source::Raw).collect();
        self.inner.write_many(keys, sources, config, false)
    }

    /// Reads each key into its buffers in order (the object is split over them); one result per key: the
    /// object's size, or `BufferOverflow` when it exceeds the buffers' total length.
    pub fn batch_get_into_multi_buffers<K: AsRef<str>, P: AsRef<[u64]>, L: AsRef<[u64]>>(
        &self,
        keys: &[K],
        ptr_lists: &[P],
        len_lists: &[L],
    ) -> Vec<Result<u64>> {
        let Ok(_open) = self.inner.op() else { return all(keys.len(), ErrorCode::UnavailableInCurrentStatus) };
        let Some(parts) = zip_parts(keys.len(), ptr_lists, len_lists) else {
            return all(keys.len(), ErrorCode::InvalidParams);
        };
        let dests = parts.into_iter().map(Dest::Raw).collect();
        self.inner.read_many(keys, dests).into_iter().map(|r| r.map(|(n, _)| n)).collect()
    }

    // ---- queries -----------------------------------------------------------------------------

    /// Whether `key` can be read now (grants a lease when it can).
    pub fn is_exist(&self, key: &str) -> Result<bool> {
        one(self.batch_is_exist(&[key]))
    }

    /// [`StoreClient::is_exist`] for many keys, in one round trip.
    pub fn batch_is_exist<K: AsRef<str>>(&self, keys: &[K]) -> Vec<Result<bool>> {
        let Ok(_open) = self.inner.op() else { return all(keys.len(), ErrorCode::UnavailableInCurrentStatus) };
        self.batch_rpc(
            keys,
            |keys| Request::Exist { keys },
            |r| match r {
                Response::Exist(v) => Ok(v),
                other => Err(other),
            },
        )
    }

    /// The size of `key` in bytes.
    pub fn get_size(&self, key: &str) -> Result<u64> {
        one(self.batch_get_size(&[key]))
    }

    /// [`StoreClient::get_size`] for many keys, in one round trip.
    pub fn batch_get_size<K: AsRef<str>>(&self, keys: &[K]) -> Vec<Result<u64>> {
        let Ok(_open) = self.inner.op() else { return all(keys.len(), ErrorCode::UnavailableInCurrentStatus) };
        self.batch_rpc(
            keys,
            |keys| Request::GetSize { keys },
            |r| match r {
                Response::Sizes(v) => Ok(v),
                other => Err(other),
            },
        )
    }

    /// The readable replicas of `key` (grants a lease).
    pub fn get_replica_desc(&self, key: &str) -> Result<Vec<ReplicaDescriptor>> {
        one(self.batch_get_replica_desc(&[key]))
    }

    /// [`StoreClient::get_replica_desc`] for many keys, in one round trip.
    pub fn batch_get_replica_desc<K: AsRef<str>>(&self, keys: &[K]) -> Vec<Result<Vec<ReplicaDescriptor>>> {
        let Ok(_open) = self.inner.op() else { return all(keys.len(), ErrorCode::UnavailableInCurrentStatus) };
        self.batch_rpc(
            keys,
            |keys| Request::GetReplicaList { keys },
            |r| match r {
                Response::Replicas(v) => Ok(v.into_iter().map(|r| r.map(|(replicas, _lease)| replicas)).collect()),
                other => Err(other),
            },
        )
    }

    // ---- removal -----------------------------------------------------------------------------

    /// Removes `key`; a leased object needs `force`.
    pub fn remove(&self, key: &str, force: bool) -> Result<()> {
        one(self.batch_remove(&[key], force))
    }

    /// Removes many keys in one round trip; one result per key.
    pub fn batch_remove<K: AsRef<str>>(&self, keys: &[K], force: bool) -> Vec<Result<()>> {
        let Ok(_open) = self.inner.op() else { return all(keys.len(), ErrorCode::UnavailableInCurrentStatus) };
        self.batch_rpc(
            keys,
            |keys| Request::Remove { keys, force },
            |r| match r {
                Response::PerKey(v) => Ok(v),
                other => Err(other),
            },
        )
    }

    /// Removes every key matching `pattern` (Rust `regex` syntax); returns how many.
    pub fn remove_by_regex(&self, pattern: &str, force: bool) -> Result<u64> {
        let _open = self.inner.op()?;
        self.count_rpc(Request::RemoveByRegex { pattern: pattern.to_string(), force })
    }

    /// Removes every key; returns how many.
    pub fn remove_all(&self, force: bool) -> Result<u64> {
        let _open = self.inner.op()?;
        self.count_rpc(Request::RemoveAll { force })
    }

    /// Clears replicas of `keys` whose lease has run out: the replica on `segment`, or whole objects when it
    /// is empty. The keys cleared.
    pub fn replica_clear(&self, keys: &[String], segment: &str) -> Result<Vec<String>> {
        let _open = self.inner.op()?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let request = Request::ReplicaClear { keys: keys.to_vec(), segment: segment.to_string() };
        match self.inner.master.call(&request)? {
            Response::Keys(cleared) => Ok(cleared),
            other => Err(wrong_kind(request.name(), &other)),
        }
    }

    // ---- more segments ----------------------------------------------------------------------

    /// Maps `[offset, offset+size)` of the file at `path` shared and contributes it as another segment. Its id
    /// (also its segment name). `InvalidParams` for a file that cannot be opened or mapped there.
    pub fn mount_file_segment(&self, path: &str, size: u64, offset: u64) -> Result<String> {
        let _open = self.inner.op()?;
        self.inner.mount_file(path, size, offset)
    }

    /// Allocates `size` bytes (rounded up to a multiple of 16 MiB) on `location` (`""`: anywhere) and
    /// contributes them as another segment. Its id and size.
    pub fn allocate_and_mount_segment(&self, size: u64, location: &str) -> Result<(String, u64)> {
        let _open = self.inner.op()?;
        self.inner.allocate_and_mount(size, location)
    }

    /// Withdraws segments mounted after setup: the master drops their replicas at once, the memory is released
    /// after `grace` (reads in flight finish) and, with `free`, given back. Without `free` only file segments
    /// may be unmounted. An unknown id (`SegmentNotFound`) or a refused one fails the call before anything is
    /// unmounted.
    pub fn unmount_segments(&self, ids: &[String], grace: Duration, free: bool) -> Result<()> {
        let _open = self.inner.op()?;
        self.inner.unmount_extras(ids, grace, free)
    }

    // ---- copy and move tasks ----------------------------------------------------------------

    /// Asks the master to copy `key` to each of `targets` (segment names); the client holding the object runs
    /// the copy. The task's id, for [`StoreClient::query_task`].
    pub fn create_copy_task(&self, key: &str, targets: &[String]) -> Result<TaskId> {
        let _open = self.inner.op()?;
        self.inner.create_copy_task(key, targets)
    }

    /// Asks the master to move `key`'s replica on segment `source` to segment `target`.
    pub fn create_move_task(&self, key: &str, source: &str, target: &str) -> Result<TaskId> {
        let _open = self.inner.op()?;
        self.inner.create_move_task(key, source, target)
    }

    /// A task's state (times in milliseconds since the Unix epoch). `TaskNotFound` for an unknown id.
    pub fn query_task(&self, id: TaskId) -> Result<TaskInfo> {
        let _open = self.inner.op()?;
        let request = Request::QueryTask { id };
        match self.inner.master.call(&request)? {
            Response::TaskInfo(r) => r.map_err(Error::from),
            other => Err(wrong_kind(request.name(), &other)),
        }
    }

    // ---- sessions -------------------------------------------------------------------------------

    /// Starts put sessions: reserves `(keys[i], sizes[i])` objects without writing them (they are not readable
    /// until [`StoreClient::put_session_end`]). One result per key; mismatched lengths fail every key with
    /// `InvalidParams`, as does a size of 0; an existing key is `ObjectAlreadyExists`.
    pub fn put_session_start(&self, keys: &[String], sizes: &[u64], config: &ReplicateConfig) -> Vec<Result<()>> {
        match self.inner.op() {
            Ok(_open) => self.inner.put_session_start(keys, sizes, config),
            Err(e) => all(keys.len(), e),
        }
    }

    /// Writes byte ranges of registered buffers into objects of open put sessions: for key `i`, each
    /// `(ptr, len, offset)` of `ranges[i]` goes to `offset` of the object, in every replica. Bytes written per
    /// key; no open session, or a range outside the object or outside registered memory, is `InvalidParams`.
    pub fn put_session_write(&self, keys: &[String], ranges: &[Ranges]) -> Vec<Result<u64>> {
        match self.inner.op() {
            Ok(_open) => self.inner.write_ranges(keys, ranges),
            Err(e) => all(keys.len(), e),
        }
    }

    /// Ends put sessions: the objects become readable. A key without an open session is `InvalidParams`.
    pub fn put_session_end(&self, keys: &[String]) -> Vec<Result<()>> {
        match self.inner.op() {
            Ok(_open) => self.inner.put_session_finish(keys, false),
            Err(e) => all(keys.len(), e),
        }
    }

    /// Abandons put sessions: the reserved space is freed and the keys stay absent.
    pub fn put_session_revoke(&self, keys: &[String]) -> Vec<Result<()>> {
        match self.inner.op() {
            Ok(_open) => self.inner.put_session_finish(keys, true),
            Err(e) => all(keys.len(), e),
        }
    }

    /// Starts get sessions: looks up each key's replicas once, for [`StoreClient::get_session_read`]. One
    /// result per key (`ObjectNotFound` for a missing one).
    pub fn get_session_start(&self, keys: &[String]) -> Vec<Result<()>> {
        match self.inner.op() {
            Ok(_open) => self.inner.get_session_start(keys),
            Err(e) => all(keys.len(), e),
        }
    }

    /// Reads byte ranges of objects with a get session into registered buffers: for key `i`, each
    /// `(ptr, len, offset)` of `ranges[i]` is filled from `offset` of the object. Bytes read per key. A cached
    /// lookup whose lease has run out is refreshed first.
    pub fn get_session_read(&self, keys: &[String], ranges: &[Ranges]) -> Vec<Result<u64>> {
        match self.inner.op() {
            Ok(_open) => self.inner.read_ranges(keys, ranges),
            Err(e) => all(keys.len(), e),
        }
    }

    /// Ends get sessions (keys without one are ignored).
    pub fn get_session_end(&self, keys: &[String]) -> Result<()> {
        let _open = self.inner.op()?;
        self.inner.get_session_end(keys);
        Ok(())
    }

    fn count_rpc(&self, request: Request) -> Result<u64> {
        match self.inner.master.call(&request)? {
            Response::Count(r) => r.map_err(Error::from),
            other => Err(wrong_kind(request.name(), &other)),
        }
    }

    /// One per-key RPC for `keys` (none when empty); the answer unpacked by `unpack`.
    fn batch_rpc<K: AsRef<str>, T>(
        &self,
        keys: &[K],
        request: impl FnOnce(Vec<String>) -> Request,
        unpack: impl FnOnce(Response) -> std::result::Result<Vec<std::result::Result<T, ErrorCode>>, Response>,
    ) -> Vec<Result<T>> {
        if keys.is_empty() {
            return Vec::new();
        }
        let request = request(keys.iter().map(|k| k.as_ref().to_string()).collect());
        match self.inner.master.call(&request) {
            Ok(response) => match unpack(response) {
                Ok(v) => per_key(request.name(), keys.len(), v),
                Err(other) => all(keys.len(), wrong_kind(request.name(), &other)),
            },
            Err(e) => all(keys.len(), e),
        }
    }
}

/// The single result of a one-key batch.
fn one<T>(v: Vec<Result<T>>) -> Result<T> {
    v.into_iter().next().unwrap_or(Err(ErrorCode::Internal.into()))
}

/// Pairs each key's pointer list with its length list; `None` when the outer lengths disagree. A key whose
/// two lists differ in length gets no parts (and so `InvalidParams`).
fn zip_parts<P: AsRef<[u64]>, L: AsRef<[u64]>>(n: usize, ptrs: &[P], lens: &[L]) -> Option<Vec<Vec<(u64, u64)>>> {
    if ptrs.len() != n || lens.len() != n {
        return None;
    }
    let key_parts = |(p, l): (&P, &L)| {
        let (p, l) = (p.as_ref(), l.as_ref());
        if p.len() == l.len() { p.iter().copied().zip(l.iter().copied()).collect() } else { Vec::new() }
    };
    Some(ptrs.iter().zip(lens).map(key_parts).collect())
}

/// The store error for a registration the engine refused.
fn register_error(ptr: u64, len: u64, e: mooncake_core::Error) -> crate::error::Error {
    match e {
        mooncake_core::Error::InvalidArgument(_) | mooncake_core::Error::AddressOverlapped { .. } => {
            errors::engine_as(ErrorCode::InvalidParams, &format!("register_buffer({ptr:#x}, {len}) refused"), &e)
        }
        e => errors::engine("register_buffer failed", &e),
    }
}
