//! The `unsafe` way to transfer from and into local memory that is not registered: upstream's TCP transport
//! sends from and receives into any local buffer, and the Python binding keeps that for its users.

use std::sync::Arc;

use super::TransferEngine;
use super::routing::LocalCheck;
use crate::completion::Batch;
use crate::error::Result;
use crate::types::{BatchId, Opcode, TransferRequest};

/// The transfer calls of [`TransferEngine`] without the check that local ranges lie in registered memory;
/// from [`TransferEngine::unchecked`].
///
/// A local range that is registered is used as such (its region is held until the request is finished). One
/// that is not is taken as memory the caller vouched for: memory of a linked device that claims it (an
/// unregistered GPU buffer, moved through that device as upstream's TCP transport does), else host memory; transports that need registered local memory
/// (shm, RDMA) still refuse it with `AddressNotRegistered`, and the engine prefers one that does not (tcp).
/// Everything else (remote ranges, lengths, limits) is checked as in the safe calls.
#[derive(Clone, Copy)]
pub struct UncheckedTransfers<'a> {
    engine: &'a TransferEngine,
}

impl std::fmt::Debug for UncheckedTransfers<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UncheckedTransfers").field("engine", &self.engine.local_segment_name()).finish()
    }
}

impl TransferEngine {
    /// Transfer calls whose unregistered local ranges the caller vouches for (see [`UncheckedTransfers`]).
    ///
    /// # Safety
    /// For every call made through the returned value, each local range that is not inside registered memory
    /// must be host memory of this process, mapped readable and writable (or memory of a linked device that
    /// claims it, such as a GPU allocation, which is never dereferenced), that stays allocated until that
    /// request is finished: until a blocking call returns (after a `Timeout`, requests may still be running,
    /// until their transport finishes them: for tcp, until the peer answers or the connection closes, so
    /// keep the memory until the engine is shut down), until the batch reports the request completed or
    /// failed, or until the async call's future completes (dropping it early leaves the requests running).
    /// The transfer reads or writes it meanwhile, so the caller keeps no Rust reference to it.
    #[allow(unsafe_code)]
    pub unsafe fn unchecked(&self) -> UncheckedTransfers<'_> {
        UncheckedTransfers { engine: self }
    }
}

impl UncheckedTransfers<'_> {
    /// [`TransferEngine::submit_transfer`] with vouched local ranges.
    pub fn submit_transfer(&self, id: BatchId, requests: &[TransferRequest]) -> Result<()> {
        let batch = self.engine.batch(id)?;
        self.submit_into(&batch, requests)
    }

    /// [`TransferEngine::submit_into`] with vouched local ranges.
    pub fn submit_into(&self, batch: &Arc<Batch>, requests: &[TransferRequest]) -> Result<()> {
        self.engine.submit_checked(batch, requests, LocalCheck::Vouched)
    }

    /// [`TransferEngine::transfer`] with vouched local ranges.
    pub async fn transfer(&self, requests: &[TransferRequest]) -> Result<Vec<Result<u64>>> {
        self.engine.transfer_checked(requests, LocalCheck::Vouched).await
    }

    /// [`TransferEngine::transfer_sync`] with a vouched local range.
    pub fn transfer_sync(&self, target: &str, opcode: Opcode, local: u64, remote: u64, len: u64) -> Result<()> {
        self.batch_transfer_sync(target, opcode, &[local], &[remote], &[len])
    }

    /// [`TransferEngine::batch_transfer_sync`] with vouched local ranges.
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

    /// [`TransferEngine::batch_transfer_sync_each`] with vouched local ranges.
    pub fn batch_transfer_sync_each(
        &self,
        target: &str,
        opcode: Opcode,
        locals: &[u64],
        remotes: &[u64],
        lengths: &[u64],
    ) -> Result<Vec<Result<()>>> {
        self.engine.sync_each_checked(target, opcode, locals, remotes, lengths, LocalCheck::Vouched)
    }
}
