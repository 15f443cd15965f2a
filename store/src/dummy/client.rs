//! The dummy side: a shared-memory pool and the calls that name ranges of it.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mooncake_core::device::FILE_HANDLE_KIND;
use mooncake_core::sync::lock;
use mooncake_core::{Allocation as DeviceAllocation, MemoryDevice, MemoryKind, SharingHandle};
use mooncake_store_rpc::{BlockingClient, ClientOptions, RpcError};

use super::POOL_PREFIX;
use super::protocol::{DummyRequest, DummyResponse, service_id};
use crate::allocator::{Allocation, OffsetAllocator};
use crate::error::{Cause, Error, Result, from_codes};
use crate::types::{ErrorCode, ReplicateConfig};

/// A value's room in the staging part, at `offset` of the pool.
struct Staged {
    alloc: Allocation,
    offset: u64,
}

/// How to reach the real client and how much shared memory to set up.
#[derive(Debug, Clone)]
pub struct DummyConfig {
    /// The real client's service, `host:port` (its `--port`, upstream's default 50052).
    pub server_address: String,
    /// Bytes of pool the application allocates buffers from (`alloc`, then the zero-copy calls).
    pub mem_pool_size: u64,
    /// Bytes of pool reserved for staging the values of `put` and `get`.
    pub local_buffer_size: u64,
    /// Bound on each call to the real client (5 s).
    pub rpc_timeout: Duration,
}

impl Default for DummyConfig {
    fn default() -> Self {
        DummyConfig {
            server_address: "127.0.0.1:50052".into(),
            mem_pool_size: 0,
            local_buffer_size: 0,
            rpc_timeout: Duration::from_secs(5),
        }
    }
}

/// A store client that works through a real client on the same host (see the module docs). `Send + Sync`.
pub struct DummyClient {
    config: DummyConfig,
    rpc: BlockingClient<DummyRequest, DummyResponse>,
    device: Arc<dyn MemoryDevice>,
    memory: DeviceAllocation,
    path: String,
    session: Mutex<Option<u64>>,
    /// The application's part, `[0, mem_pool_size)`, and what `alloc` handed out of it, by address.
    pool: Mutex<(OffsetAllocator, HashMap<u64, Allocation>)>,
    /// Staging for values, `[mem_pool_size, mem_pool_size + local_buffer_size)`.
    staging: Mutex<OffsetAllocator>,
    closed: AtomicBool,
}

impl std::fmt::Debug for DummyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DummyClient").field("server", &self.config.server_address).field("pool", &self.path).finish()
    }
}

/// The real client answered every key with `ClientNotFound`: it does not know our session (it restarted).
fn session_unknown<T>(results: &[std::result::Result<T, ErrorCode>]) -> bool {
    !results.is_empty() && results.iter().all(|r| matches!(r, Err(ErrorCode::ClientNotFound)))
}

/// A failed call to the real client: `RpcTimeout` or `RpcFail`, with the RPC error as its cause.
fn rpc_error(e: &RpcError) -> Error {
    tracing::warn!(error = %e, "call to the real client failed");
    let kind = match e {
        RpcError::Timeout { .. } => ErrorCode::RpcTimeout,
        _ => ErrorCode::RpcFail,
    };
    Error::with_cause(kind, Cause::RealClient { source: e.clone() })
}

impl DummyClient {
    /// Creates the pool, maps it and attaches it to the real client. A pool of 0 bytes in all is
    /// `InvalidParams`; an unreachable real client `RpcFail` (within the connect timeout).
    pub fn attach(config: DummyConfig) -> Result<DummyClient> {
        let total = config.mem_pool_size.checked_add(config.local_buffer_size).ok_or(ErrorCode::InvalidParams)?;
        if total == 0 || total > isize::MAX as u64 {
            return Err(ErrorCode::InvalidParams.into());
        }
        let device = mooncake_core::registry::available_devices()
            .into_iter()
            .find(|d| d.kind() == MemoryKind::Host)
            .ok_or_else(|| {
                tracing::error!("no host memory device is linked");
                ErrorCode::Internal
            })?;
        let path = format!("{POOL_PREFIX}{}-{:x}", std::process::id(), crate::types::ClientId::random().0 as u64);
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(|e| {
            tracing::error!(path, error = %e, "cannot create the shared-memory pool");
            ErrorCode::Internal
        })?;
        let cleanup = |e| {
            let _ = std::fs::remove_file(&path);
            e
        };
        file.set_len(total).map_err(|e| {
            tracing::error!(path, error = %e, "cannot size the shared-memory pool");
            cleanup(ErrorCode::NoAvailableHandle)
        })?;
        let handle = SharingHandle {
            kind: FILE_HANDLE_KIND.into(),
            data: Vec::new(),
            fd: Some(Arc::new(OwnedFd::from(file))),
            len: total,
        };
        let memory = device.import_handle(&handle).map_err(|e| {
            tracing::error!(path, error = %e, "cannot map the shared-memory pool");
            cleanup(ErrorCode::Internal)
        })?;
        let options = ClientOptions { request_timeout: config.rpc_timeout, ..ClientOptions::default() };
        let rpc = BlockingClient::new(&config.server_address, service_id(), options);
        let client = DummyClient {
            pool: Mutex::new((OffsetAllocator::new(config.mem_pool_size), HashMap::new())),
            staging: Mutex::new(OffsetAllocator::new(config.local_buffer_size)),
            config,
            rpc,
            device,
            memory,
            path,
            session: Mutex::new(None),
            closed: AtomicBool::new(false),
        };
        client.session()?;
        tracing::info!(server = %client.config.server_address, pool = %client.path, bytes = total, "dummy client attached");
        Ok(client)
    }

    /// Start of the application's part of the pool (the zero-copy calls take addresses in it).
    pub fn pool_base(&self) -> u64 {
        self.memory.addr
    }

    /// The application's part of the pool, in bytes.
    pub fn pool_size(&self) -> u64 {
        self.config.mem_pool_size
    }

    /// Bytes for staging values.
    pub fn local_buffer_size(&self) -> u64 {
        self.config.local_buffer_size
    }

    /// `len` bytes of the pool for the application (aligned), or `None` when it has no room.
    pub fn alloc(&self, len: u64) -> Option<u64> {
        let mut pool = lock(&self.pool);
        let a = pool.0.allocate(len)?;
        let addr = self.memory.addr + a.offset();
        pool.1.insert(addr, a);
        Some(addr)
    }

    /// Gives back what `alloc` returned at `addr`; false when it did not.
    pub fn free(&self, addr: u64) -> bool {
        let mut pool = lock(&self.pool);
        match pool.1.remove(&addr) {
            Some(a) => pool.0.free(a).is_ok(),
            None => false,
        }
    }

    /// True when `[addr, addr+len)` lies in the application's part of the pool.
    pub fn in_pool(&self, addr: u64, len: u64) -> bool {
        len > 0
            && addr >= self.memory.addr
            && addr.checked_add(len).is_some_and(|end| end <= self.memory.addr + self.config.mem_pool_size)
    }

    /// Stores `parts` (concatenated) under `key`, staged through the local buffer.
    pub fn put_parts(&self, key: &str, parts: &[&[u8]], config: &ReplicateConfig, upsert: bool) -> Result<()> {
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let staged = self.stage(len)?;
        let mut off = staged.offset;
        for p in parts {
            if let Err(e) = self.copy_in(p, off) {
                self.unstage(staged);
                return Err(e);
            }
            off += p.len() as u64;
        }
        let r = self.write(&[key.to_string()], &[(staged.offset, len)], config, upsert);
        self.unstage(staged);
        r.into_iter().next().unwrap_or(Err(ErrorCode::Internal.into()))
    }

    /// The value of `key`, read through the local buffer.
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        let keys = [key.to_string()];
        let size = self.get_size(&keys).into_iter().next().unwrap_or(Err(ErrorCode::Internal.into()))?;
        let staged = self.stage(size.max(1))?;
        let read =
            self.read(&keys, &[(staged.offset, size)]).into_iter().next().unwrap_or(Err(ErrorCode::Internal.into()));
        let out = read.and_then(|n| {
            let mut v = vec![0u8; n as usize];
            self.device.copy_to_host(&self.memory, staged.offset, &mut v).map_err(|_| ErrorCode::Internal)?;
            Ok(v)
        });
        self.unstage(staged);
        out
    }

    /// Zero-copy writes: each key's bytes at `ptrs[i]` (`lens[i]` of them, inside the pool).
    pub fn put_from(
        &self,
        keys: &[String],
        ptrs: &[u64],
        lens: &[u64],
        config: &ReplicateConfig,
        upsert: bool,
    ) -> Vec<Result<()>> {
        match self.ranges(keys, ptrs, lens) {
            Ok(ranges) => self.write(keys, &ranges, config, upsert),
            Err(e) => vec![Err(e); keys.len()],
        }
    }

    /// Zero-copy reads into `ptrs[i]` (capacity `lens[i]`, inside the pool): bytes read per key.
    pub fn get_into(&self, keys: &[String], ptrs: &[u64], lens: &[u64]) -> Vec<Result<u64>> {
        match self.ranges(keys, ptrs, lens) {
            Ok(ranges) => self.read(keys, &ranges),
            Err(e) => vec![Err(e); keys.len()],
        }
    }

    /// Whether keys exist.
    pub fn exist(&self, keys: &[String]) -> Vec<Result<bool>> {
        match self.call(&DummyRequest::Exist { keys: keys.to_vec() }) {
            Ok(DummyResponse::Exist(v)) if v.len() == keys.len() => from_codes(v),
            Ok(_) => vec![Err(ErrorCode::Internal.into()); keys.len()],
            Err(e) => vec![Err(e); keys.len()],
        }
    }

    /// Object sizes.
    pub fn get_size(&self, keys: &[String]) -> Vec<Result<u64>> {
        match self.call(&DummyRequest::GetSize { keys: keys.to_vec() }) {
            Ok(DummyResponse::Sizes(v)) if v.len() == keys.len() => from_codes(v),
            Ok(_) => vec![Err(ErrorCode::Internal.into()); keys.len()],
            Err(e) => vec![Err(e); keys.len()],
        }
    }

    /// Removes keys.
    pub fn remove(&self, keys: &[String], force: bool) -> Vec<Result<()>> {
        match self.call(&DummyRequest::Remove { keys: keys.to_vec(), force }) {
            Ok(DummyResponse::PerKey(v)) if v.len() == keys.len() => from_codes(v),
            Ok(_) => vec![Err(ErrorCode::Internal.into()); keys.len()],
            Err(e) => vec![Err(e); keys.len()],
        }
    }

    /// Removes every key; how many went.
    pub fn remove_all(&self, force: bool) -> Result<u64> {
        match self.call(&DummyRequest::RemoveAll { force })? {
            DummyResponse::Count(r) => r.map_err(Error::from),
            _ => Err(ErrorCode::Internal.into()),
        }
    }

    /// The real client's segment name and health (0 ok, 2 master unreachable).
    pub fn status(&self) -> Result<(String, i32)> {
        match self.call(&DummyRequest::Status)? {
            DummyResponse::Status(name, health) => Ok((name, health)),
            _ => Err(ErrorCode::Internal.into()),
        }
    }

    /// Detaches from the real client, unmaps the pool and deletes its file. Idempotent.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(session) = lock(&self.session).take() {
            let _ = self.rpc.call_with_timeout(&DummyRequest::Detach { session }, Duration::from_secs(2));
        }
        if let Err(e) = self.device.free(&self.memory) {
            tracing::warn!(error = %e, "cannot unmap the pool");
        }
        let _ = std::fs::remove_file(&self.path);
    }

    // ---- internals ---------------------------------------------------------------------------

    fn write(&self, keys: &[String], ranges: &[(u64, u64)], config: &ReplicateConfig, upsert: bool) -> Vec<Result<()>> {
        let make = |session| DummyRequest::Write {
            session,
            keys: keys.to_vec(),
            ranges: ranges.to_vec(),
            config: config.clone(),
            upsert,
        };
        match self.session_call(make) {
            Ok(DummyResponse::PerKey(v)) if v.len() == keys.len() => from_codes(v),
            Ok(_) => vec![Err(ErrorCode::Internal.into()); keys.len()],
            Err(e) => vec![Err(e); keys.len()],
        }
    }

    fn read(&self, keys: &[String], ranges: &[(u64, u64)]) -> Vec<Result<u64>> {
        let make = |session| DummyRequest::Read { session, keys: keys.to_vec(), ranges: ranges.to_vec() };
        match self.session_call(make) {
            Ok(DummyResponse::Sizes(v)) if v.len() == keys.len() => from_codes(v),
            Ok(_) => vec![Err(ErrorCode::Internal.into()); keys.len()],
            Err(e) => vec![Err(e); keys.len()],
        }
    }

    /// Pool offsets of caller ranges (each inside the application's part).
    fn ranges(&self, keys: &[String], ptrs: &[u64], lens: &[u64]) -> Result<Vec<(u64, u64)>> {
        if ptrs.len() != keys.len() || lens.len() != keys.len() {
            return Err(ErrorCode::InvalidParams.into());
        }
        // A range outside the pool gets an offset past its end, which the real client refuses for that key.
        Ok(ptrs
            .iter()
            .zip(lens)
            .map(|(&p, &l)| if self.in_pool(p, l) { (p - self.memory.addr, l) } else { (u64::MAX, l) })
            .collect())
    }

    /// Room for `len` bytes in the staging part (`InvalidParams` when larger than it, `NoAvailableHandle` while
    /// other calls fill it).
    fn stage(&self, len: u64) -> Result<Staged> {
        if len > self.config.local_buffer_size {
            tracing::error!(
                len,
                local_buffer_size = self.config.local_buffer_size,
                "value larger than the local buffer"
            );
            return Err(ErrorCode::InvalidParams.into());
        }
        let alloc = lock(&self.staging).allocate(len).ok_or(ErrorCode::NoAvailableHandle)?;
        Ok(Staged { offset: self.config.mem_pool_size + alloc.offset(), alloc })
    }

    fn unstage(&self, staged: Staged) {
        let _ = lock(&self.staging).free(staged.alloc);
    }

    fn copy_in(&self, bytes: &[u8], offset: u64) -> Result<()> {
        self.device.copy_from_host(bytes, &self.memory, offset).map_err(|e| {
            tracing::error!(error = %e, "cannot copy a value into the pool");
            Error::with_cause(
                ErrorCode::Internal,
                Cause::Engine { context: "copying a value into the pool".into(), source: e },
            )
        })
    }

    /// The session, attaching first when there is none.
    fn session(&self) -> Result<u64> {
        if self.closed.load(Ordering::Acquire) {
            return Err(ErrorCode::UnavailableInCurrentStatus.into());
        }
        let mut s = lock(&self.session);
        if let Some(id) = *s {
            return Ok(id);
        }
        let req = DummyRequest::Attach { path: self.path.clone(), size: self.memory.len };
        match self.rpc.call(&req) {
            Ok(DummyResponse::Attached(Ok(id))) => {
                *s = Some(id);
                Ok(id)
            }
            Ok(DummyResponse::Attached(Err(e))) => Err(e.into()),
            Ok(_) => Err(ErrorCode::Internal.into()),
            Err(e) => Err(rpc_error(&e)),
        }
    }

    /// A call that needs no session.
    fn call(&self, req: &DummyRequest) -> Result<DummyResponse> {
        if self.closed.load(Ordering::Acquire) {
            return Err(ErrorCode::UnavailableInCurrentStatus.into());
        }
        self.rpc.call(req).map_err(|e| {
            *lock(&self.session) = None;
            rpc_error(&e)
        })
    }

    /// A call on the session; attaches again (once) when the real client no longer knows it (it restarted).
    fn session_call(&self, make: impl Fn(u64) -> DummyRequest) -> Result<DummyResponse> {
        for attempt in 0..2 {
            let session = self.session()?;
            let resp = self.call(&make(session))?;
            let stale = match &resp {
                DummyResponse::PerKey(v) => session_unknown(v),
                DummyResponse::Sizes(v) => session_unknown(v),
                _ => false,
            };
            if !stale || attempt == 1 {
                return Ok(resp);
            }
            *lock(&self.session) = None;
        }
        Err(ErrorCode::Internal.into())
    }
}

impl Drop for DummyClient {
    fn drop(&mut self) {
        self.close();
    }
}
