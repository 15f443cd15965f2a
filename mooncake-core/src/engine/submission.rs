//! Submission paths: batches the caller polls, the async `transfer`, and the blocking sync calls; each plans
//! (refreshing stale descriptors once) and launches requests on the chosen transports.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::routing::{LocalCheck, Plan, Retry, Route};
use super::{Inner, TransferEngine, spawn_on};
use crate::completion::Batch;
use crate::error::{Error, Result};
use crate::sync;
use crate::transport::{BlockingRequest, TransferTask};
use crate::types::{BatchId, Opcode, SegmentHandle, TransferRequest, TransferStatus};

impl TransferEngine {
    // ---- batches ---------------------------------------------------------------------------

    /// Allocates a batch for up to `capacity` requests.
    pub fn allocate_batch(&self, capacity: usize) -> Result<BatchId> {
        if capacity == 0 {
            return Err(Error::InvalidArgument("batch capacity must be at least 1".into()));
        }
        let id = self.inner.next_batch.fetch_add(1, Ordering::Relaxed);
        sync::lock(&self.inner.batches).insert(id, Batch::new(capacity));
        Ok(id)
    }

    /// The batch object (to await or poll it directly).
    pub fn batch(&self, id: BatchId) -> Result<Arc<Batch>> {
        sync::lock(&self.inner.batches).get(&id).cloned().ok_or(Error::UnknownBatch(id))
    }

    /// Frees a batch; [`Error::BatchBusy`] while requests are in flight.
    pub fn free_batch(&self, id: BatchId) -> Result<()> {
        let mut map = sync::lock(&self.inner.batches);
        let batch = map.get(&id).ok_or(Error::UnknownBatch(id))?;
        if !batch.is_done() {
            return Err(Error::BatchBusy(id));
        }
        map.remove(&id);
        Ok(())
    }

    /// Submits requests into a batch (they accumulate up to its capacity). The whole submission
    /// is rejected, with nothing started, when any request is invalid.
    pub fn submit_transfer(&self, id: BatchId, requests: &[TransferRequest]) -> Result<()> {
        let batch = self.batch(id)?;
        self.submit_into(&batch, requests)
    }

    /// Submits into a batch object (see [`TransferEngine::submit_transfer`]).
    pub fn submit_into(&self, batch: &Arc<Batch>, requests: &[TransferRequest]) -> Result<()> {
        self.submit_checked(batch, requests, LocalCheck::Registered)
    }

    pub(super) fn submit_checked(
        &self,
        batch: &Arc<Batch>,
        requests: &[TransferRequest],
        check: LocalCheck,
    ) -> Result<()> {
        let plan = self.plan_blocking(requests, check)?;
        self.inner.launch(batch, requests, plan)
    }

    /// Validates and routes requests, re-reading stale descriptors once (blocking).
    pub(super) fn plan_blocking(&self, requests: &[TransferRequest], check: LocalCheck) -> Result<Plan> {
        match self.inner.plan(requests, true, check) {
            Err(Retry::Refresh(handles)) => {
                self.run(refresh_all(self.inner.clone(), handles))?;
                self.inner.plan(requests, false, check).map_err(Retry::into_error)
            }
            first => first.map_err(Retry::into_error),
        }
    }

    /// [`TransferEngine::plan_blocking`] for async callers (the refresh runs on the engine's runtime).
    async fn plan_async(&self, requests: &[TransferRequest], check: LocalCheck) -> Result<Plan> {
        match self.inner.plan(requests, true, check) {
            Err(Retry::Refresh(handles)) => {
                spawn_on(&self.inner.handle, refresh_all(self.inner.clone(), handles)).await?;
                self.inner.plan(requests, false, check).map_err(Retry::into_error)
            }
            first => first.map_err(Retry::into_error),
        }
    }

    /// Async form of submission + completion: runs the requests and returns one result per request
    /// (bytes moved or a typed error). Runtime-agnostic.
    pub async fn transfer(&self, requests: &[TransferRequest]) -> Result<Vec<Result<u64>>> {
        self.transfer_checked(requests, LocalCheck::Registered).await
    }

    pub(super) async fn transfer_checked(
        &self,
        requests: &[TransferRequest],
        check: LocalCheck,
    ) -> Result<Vec<Result<u64>>> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let plan = self.plan_async(requests, check).await?;
        let batch = Batch::new(requests.len());
        self.inner.launch(&batch, requests, plan)?;
        batch.wait().await;
        Ok((0..batch.len()).map(|i| batch.result(i)).collect())
    }

    /// Status of one request of a batch.
    pub fn transfer_status(&self, id: BatchId, task: usize) -> Result<TransferStatus> {
        self.batch(id)?.status(task)
    }

    /// Aggregate status of a batch.
    pub fn batch_status(&self, id: BatchId) -> Result<TransferStatus> {
        Ok(self.batch(id)?.overall())
    }

    // ---- sync helpers ----------------------------------------------------------------------

    /// Timeout of a sync call moving `bytes`: `MC_TRANSFER_TIMEOUT` plus 1 ns per byte.
    pub fn sync_timeout(&self, bytes: u64) -> Duration {
        self.inner.config.transfer_timeout + Duration::from_nanos(bytes)
    }

    /// Blocking read or write of one range (upstream `transfer_sync_*`).
    pub fn transfer_sync(&self, target: &str, opcode: Opcode, local: u64, remote: u64, len: u64) -> Result<()> {
        self.batch_transfer_sync(target, opcode, &[local], &[remote], &[len])
    }

    /// Blocking batch to one segment; fails with the first error. Times out per
    /// [`TransferEngine::sync_timeout`].
    pub fn batch_transfer_sync(
        &self,
        target: &str,
        opcode: Opcode,
        locals: &[u64],
        remotes: &[u64],
        lengths: &[u64],
    ) -> Result<()> {
        self.batch_transfer_sync_each(target, opcode, locals, remotes, lengths)?.into_iter().collect()
    }

    /// Blocking batch to one segment with one result per request, in order. `Err` is for the whole call
    /// (mismatched lists, unknown segment, a request that fails validation); a request that fails while moving
    /// data fails only its own entry, and entries still unfinished at [`TransferEngine::sync_timeout`] fail with
    /// `Timeout`. Transports with a caller-thread path run the requests on this thread
    /// ([`Transport::transfer_blocking`], [`Transport::transfer_blocking_batch`]).
    pub fn batch_transfer_sync_each(
        &self,
        target: &str,
        opcode: Opcode,
        locals: &[u64],
        remotes: &[u64],
        lengths: &[u64],
    ) -> Result<Vec<Result<()>>> {
        self.sync_each_checked(target, opcode, locals, remotes, lengths, LocalCheck::Registered)
    }

    pub(super) fn sync_each_checked(
        &self,
        target: &str,
        opcode: Opcode,
        locals: &[u64],
        remotes: &[u64],
        lengths: &[u64],
        check: LocalCheck,
    ) -> Result<Vec<Result<()>>> {
        if locals.len() != remotes.len() || locals.len() != lengths.len() {
            return Err(Error::InvalidArgument(format!(
                "{} local addresses, {} remote addresses and {} lengths",
                locals.len(),
                remotes.len(),
                lengths.len()
            )));
        }
        if locals.is_empty() {
            return Ok(Vec::new());
        }
        let handle = self.open_segment(target)?;
        let requests: Vec<TransferRequest> = (0..locals.len())
            .map(|i| TransferRequest {
                opcode,
                local_addr: locals[i],
                target: handle,
                remote_addr: remotes[i],
                length: lengths[i],
            })
            .collect();
        let plan = self.plan_blocking(&requests, check)?;
        let timeout = self.sync_timeout(lengths.iter().sum());
        let first = &plan.routes[0];
        if plan.routes.iter().all(|r| r.transport == first.transport) {
            // The calling thread may run them itself (no hand-off to the runtime and back).
            let transport = &self.inner.transports[first.transport];
            let direct = if let [r] = requests.as_slice() {
                transport
                    .transfer_blocking(&first.seg, opcode, &first.local, r.remote_addr, timeout)
                    .map(|result| vec![result])
            } else {
                let pieces: Vec<BlockingRequest> = plan
                    .routes
                    .iter()
                    .zip(&requests)
                    .map(|(route, r)| BlockingRequest { local: route.local.clone(), remote_addr: r.remote_addr })
                    .collect();
                transport.transfer_blocking_batch(&first.seg, opcode, &pieces, timeout)
            };
            if let Some(results) = direct.filter(|r| r.len() == requests.len()) {
                return Ok(results.into_iter().map(|r| r.map(|_| ())).collect());
            }
        }
        let batch = Batch::new(requests.len());
        self.inner.launch(&batch, &requests, plan)?;
        // A timeout marks the unfinished requests; their statuses say so.
        let _ = batch.wait_blocking(timeout);
        Ok((0..requests.len()).map(|i| batch.result(i).map(drop)).collect())
    }
}

/// Re-reads the descriptors of `handles` (run on the engine's runtime).
async fn refresh_all(inner: Arc<Inner>, handles: Vec<SegmentHandle>) -> Result<()> {
    for h in handles {
        inner.refresh(h).await?;
    }
    Ok(())
}

impl Inner {
    /// Starts the validated `requests` in `batch`; each task carries its local range (and so its region) until
    /// it is finished.
    pub(super) fn launch(&self, batch: &Arc<Batch>, requests: &[TransferRequest], plan: Plan) -> Result<()> {
        let start = batch.reserve(requests.len())?;
        let mut routes = plan.routes.into_iter().zip(requests).enumerate().peekable();
        // Group consecutive requests by (transport, segment) so each transport gets one call.
        while let Some((k, (route, r))) = routes.next() {
            let Route { transport, seg, local } = route;
            let task = |k: usize, local, r: &TransferRequest| TransferTask {
                opcode: r.opcode,
                local,
                remote_addr: r.remote_addr,
                completion: batch.completion(start + k),
            };
            let mut tasks = vec![task(k, local, r)];
            while let Some((k, (next, r))) =
                routes.next_if(|(_, (next, _))| next.transport == transport && next.seg.handle == seg.handle)
            {
                tasks.push(task(k, next.local, r));
            }
            self.transports[transport].submit(&seg, tasks);
        }
        Ok(())
    }
}
