//! The real client's side: serves dummy clients from a [`StoreClient`] over RPC on 127.0.0.1.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use mooncake_core::device::FILE_HANDLE_KIND;
use mooncake_core::sync::lock;
use mooncake_core::{Allocation as DeviceAllocation, MemoryDevice, MemoryKind, SharingHandle};
use mooncake_store_rpc::{PeerInfo, RpcError, RpcServer};

use super::POOL_PREFIX;
use super::protocol::{DummyRequest, DummyResponse, service_id};
use crate::client::StoreClient;
use crate::error::codes;
use crate::types::{ErrorCode, Result};

/// A dummy's pool, mapped here and registered with the real client.
struct Pool {
    memory: DeviceAllocation,
}

struct State {
    client: StoreClient,
    device: Arc<dyn MemoryDevice>,
    pools: Mutex<HashMap<u64, Pool>>,
}

/// The real client's service for dummy clients. Stops when dropped or shut down; pools still attached are
/// unregistered and unmapped then.
pub struct RealClientService {
    server: Option<RpcServer>,
    state: Arc<State>,
}

impl RealClientService {
    /// Serves dummy clients of `client` on `127.0.0.1:port` (0 for any free port). Call from a tokio runtime.
    /// Fails (with the reason) when no host memory device is linked or the port cannot be bound.
    pub async fn start(client: StoreClient, port: u16) -> std::result::Result<RealClientService, String> {
        let device = client
            .engine()
            .devices()
            .iter()
            .find(|d| d.kind() == MemoryKind::Host)
            .cloned()
            .ok_or_else(|| "no host memory device is linked".to_string())?;
        let state = Arc::new(State { client, device, pools: Mutex::new(HashMap::new()) });
        let handler_state = state.clone();
        let handler = move |req: DummyRequest, _peer: PeerInfo| {
            let state = handler_state.clone();
            async move {
                match tokio::task::spawn_blocking(move || state.handle(req)).await {
                    Ok(resp) => resp,
                    Err(e) => {
                        tracing::error!(error = %e, "a dummy-client request panicked");
                        DummyResponse::Done(Err(ErrorCode::Internal))
                    }
                }
            }
        };
        let server = RpcServer::bind(format!("127.0.0.1:{port}"), service_id(), handler)
            .await
            .map_err(|e: RpcError| format!("cannot serve dummy clients on 127.0.0.1:{port}: {e}"))?;
        Ok(RealClientService { server: Some(server), state })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.as_ref().map(|s| s.local_addr()).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Dummy pools attached now.
    pub fn attached(&self) -> usize {
        lock(&self.state.pools).len()
    }

    /// Stops serving and releases every attached pool.
    pub async fn shutdown(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        self.state.release_all();
    }
}

impl Drop for RealClientService {
    fn drop(&mut self) {
        self.state.release_all();
    }
}

impl State {
    fn handle(&self, req: DummyRequest) -> DummyResponse {
        let c = &self.client;
        match req {
            DummyRequest::Attach { path, size } => DummyResponse::Attached(self.attach(&path, size)),
            DummyRequest::Detach { session } => DummyResponse::Done(self.detach(session)),
            DummyRequest::Write { session, keys, ranges, config, upsert } => {
                let addrs = match self.resolve_all(session, &keys, &ranges) {
                    Ok(a) => a,
                    Err(e) => return DummyResponse::PerKey(vec![Err(e); keys.len()]),
                };
                let (ok, ptrs, lens) = split(&addrs, &ranges);
                let done = if upsert {
                    c.batch_upsert_from(&pick(&keys, &ok), &ptrs, &lens, &config)
                } else {
                    c.batch_put_from(&pick(&keys, &ok), &ptrs, &lens, &config)
                };
                DummyResponse::PerKey(merge(&addrs, codes(done)))
            }
            DummyRequest::Read { session, keys, ranges } => {
                let addrs = match self.resolve_all(session, &keys, &ranges) {
                    Ok(a) => a,
                    Err(e) => return DummyResponse::Sizes(vec![Err(e); keys.len()]),
                };
                let (ok, ptrs, lens) = split(&addrs, &ranges);
                DummyResponse::Sizes(merge(&addrs, codes(c.batch_get_into(&pick(&keys, &ok), &ptrs, &lens))))
            }
            DummyRequest::Exist { keys } => DummyResponse::Exist(codes(c.batch_is_exist(&keys))),
            DummyRequest::GetSize { keys } => DummyResponse::Sizes(codes(c.batch_get_size(&keys))),
            DummyRequest::Remove { keys, force } => DummyResponse::PerKey(codes(c.batch_remove(&keys, force))),
            DummyRequest::RemoveAll { force } => DummyResponse::Count(c.remove_all(force).map_err(|e| e.kind())),
            DummyRequest::Status => DummyResponse::Status(c.hostname().to_string(), c.health()),
        }
    }

    fn attach(&self, path: &str, size: u64) -> Result<u64> {
        let named_by_us =
            path.starts_with(POOL_PREFIX) && !path.contains("..") && !path[POOL_PREFIX.len()..].contains('/');
        if !named_by_us || size == 0 {
            tracing::warn!(path, size, "refusing to attach a pool this module did not name");
            return Err(ErrorCode::InvalidParams);
        }
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| {
            tracing::warn!(path, error = %e, "cannot open a dummy client's pool");
            ErrorCode::InvalidParams
        })?;
        let handle = SharingHandle {
            kind: FILE_HANDLE_KIND.into(),
            data: Vec::new(),
            fd: Some(Arc::new(OwnedFd::from(file))),
            len: size,
        };
        let memory = self.device.import_handle(&handle).map_err(|e| {
            tracing::warn!(path, error = %e, "cannot map a dummy client's pool");
            ErrorCode::InvalidParams
        })?;
        if let Err(e) = self.client.register_device_buffer(&self.device, &memory) {
            let _ = self.device.free(&memory);
            return Err(e.kind());
        }
        // Random ids: a dummy that still holds an id from before a restart of this real client must not find
        // another dummy's pool under it (counters would restart at the same values).
        let mut pools = lock(&self.pools);
        let session = loop {
            let id = crate::types::ClientId::random().0 as u64;
            if id != 0 && !pools.contains_key(&id) {
                break id;
            }
        };
        tracing::info!(path, size, session, "dummy client attached");
        pools.insert(session, Pool { memory });
        Ok(session)
    }

    fn detach(&self, session: u64) -> Result<()> {
        let pool = lock(&self.pools).remove(&session).ok_or(ErrorCode::ClientNotFound)?;
        self.release(pool);
        Ok(())
    }

    fn release(&self, pool: Pool) {
        if let Err(e) = self.client.unregister_buffer(pool.memory.addr) {
            tracing::debug!(error = %e, "pool was not registered (client closed?)");
        }
        if let Err(e) = self.device.free(&pool.memory) {
            tracing::warn!(error = %e, "cannot unmap a dummy client's pool");
        }
    }

    fn release_all(&self) {
        let pools: Vec<Pool> = lock(&self.pools).drain().map(|(_, p)| p).collect();
        for p in pools {
            self.release(p);
        }
    }

    /// Address of each `(offset, len)` in the session's pool (`InvalidParams` per range outside it);
    /// `ClientNotFound` for an unknown session, `InvalidParams` for mismatched lengths.
    fn resolve_all(&self, session: u64, keys: &[String], ranges: &[(u64, u64)]) -> Result<Vec<Result<u64>>> {
        if keys.len() != ranges.len() {
            return Err(ErrorCode::InvalidParams);
        }
        let pools = lock(&self.pools);
        let pool = pools.get(&session).ok_or(ErrorCode::ClientNotFound)?;
        Ok(ranges
            .iter()
            .map(|&(off, len)| {
                off.checked_add(len)
                    .filter(|end| *end <= pool.memory.len && len > 0)
                    .map(|_| pool.memory.addr + off)
                    .ok_or(ErrorCode::InvalidParams)
            })
            .collect())
    }
}

/// The positions with a valid address, and their addresses and lengths.
fn split(addrs: &[Result<u64>], ranges: &[(u64, u64)]) -> (Vec<usize>, Vec<u64>, Vec<u64>) {
    let ok: Vec<usize> = (0..addrs.len()).filter(|&i| addrs[i].is_ok()).collect();
    let ptrs = ok.iter().filter_map(|&i| addrs[i].ok()).collect();
    let lens = ok.iter().map(|&i| ranges[i].1).collect();
    (ok, ptrs, lens)
}

fn pick(keys: &[String], idx: &[usize]) -> Vec<String> {
    idx.iter().map(|&i| keys[i].clone()).collect()
}

/// One result per key: the error of an invalid range, else the next result of the call made for the valid ones.
fn merge<T>(addrs: &[Result<u64>], done: Vec<Result<T>>) -> Vec<Result<T>> {
    let mut done = done.into_iter();
    addrs
        .iter()
        .map(|a| match a {
            Err(e) => Err(*e),
            Ok(_) => done.next().unwrap_or(Err(ErrorCode::Internal)),
        })
        .collect()
}
