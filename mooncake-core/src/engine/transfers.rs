//! The typed blocking entry point: many transfers to several segments, one result per transfer, in order.
//!
//! [`TransferEngine::start_transfers`] starts them and [`PendingTransfers::wait`] waits (bounded by
//! [`TransferEngine::sync_timeout`]); [`TransferEngine::run_transfers`] does both. The engine decides how each
//! call runs:
//!
//! - A call whose transfers all go to one segment with one opcode and move at most [`CALLER_THREAD_MAX_BYTES`]
//!   runs at `wait` through the transports' caller-thread path (TCP sends and receives on the calling thread,
//!   pipelining a batch on one connection): no hand-off to the runtime and back, which is most of a small
//!   transfer's latency.
//! - Larger or mixed calls are submitted at `start`, grouped by segment so each transport sees runs of requests
//!   to one peer, and run in the background; work the caller does between `start` and `wait` (copying its
//!   own replicas, say) overlaps them.
//! - Failures stay with their own transfers: a segment that cannot be opened fails its transfers only, and a
//!   group the engine rejects as a whole (one bad range) is retried one transfer at a time, unless the peer
//!   itself is unreachable.

use std::sync::Arc;

use super::TransferEngine;
use crate::completion::Batch;
use crate::error::{Error, Result};
use crate::types::{Opcode, TransferRequest};

/// Most bytes a call may move through the caller-thread path. Small calls gain from running on the calling
/// thread; large ones from being submitted at `start` (striped over connections, overlapping the caller's work).
pub const CALLER_THREAD_MAX_BYTES: u64 = 1 << 20;

/// One transfer of a [`TransferEngine::start_transfers`] call, between local memory and segment
/// `targets[target]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// Index into the call's list of segment names.
    pub target: usize,
    /// Read (remote into local) or write (local into remote).
    pub opcode: Opcode,
    /// Address in this process.
    pub local_addr: u64,
    /// Address in the target's process.
    pub remote_addr: u64,
    /// Bytes to move.
    pub length: u64,
}

enum Slot {
    Batch(usize),
    Failed(Error),
}

/// Transfers started and not yet waited for; [`PendingTransfers::wait`] gives their results.
#[must_use = "transfers are only finished (and their results known) after wait()"]
pub struct PendingTransfers {
    engine: TransferEngine,
    batch: Option<Arc<Batch>>,
    slots: Vec<Slot>,
    /// Transfers to one segment with one opcode, run at `wait` through the caller-thread path.
    deferred: Option<(String, Vec<Transfer>)>,
    bytes: u64,
}

impl TransferEngine {
    /// Starts `transfers` (targets named by `targets`); see the module docs for how the call runs. Nothing
    /// blocks on the transfers themselves. A transfer naming no target fails with `InvalidArgument` at `wait`.
    pub fn start_transfers<S: AsRef<str>>(&self, targets: &[S], transfers: &[Transfer]) -> PendingTransfers {
        let bytes = transfers.iter().fold(0u64, |acc, t| acc.saturating_add(t.length));
        let mut pending =
            PendingTransfers { engine: self.clone(), batch: None, slots: Vec::new(), deferred: None, bytes };
        if let Some(first) = transfers.first() {
            let alike = transfers.iter().all(|t| t.target == first.target && t.opcode == first.opcode);
            if let (true, true, Some(name)) = (alike, bytes <= CALLER_THREAD_MAX_BYTES, targets.get(first.target)) {
                pending.deferred = Some((name.as_ref().to_string(), transfers.to_vec()));
                return pending;
            }
        }
        pending.slots = (0..transfers.len()).map(|_| Slot::Failed(Error::Canceled)).collect();
        if transfers.is_empty() {
            return pending;
        }
        let batch = Batch::new(transfers.len());
        let mut order: Vec<usize> = (0..transfers.len()).collect();
        order.sort_by_key(|&i| transfers[i].target);
        for group in order.chunk_by(|&a, &b| transfers[a].target == transfers[b].target) {
            self.submit_group(&batch, targets, transfers, group, &mut pending.slots);
        }
        pending.batch = Some(batch);
        pending
    }

    /// [`TransferEngine::start_transfers`] and [`PendingTransfers::wait`]: one result per transfer, in order.
    pub fn run_transfers<S: AsRef<str>>(&self, targets: &[S], transfers: &[Transfer]) -> Vec<Result<()>> {
        self.start_transfers(targets, transfers).wait()
    }

    /// Submits the transfers of `group` (all to one target) into `batch`, recording where each went.
    fn submit_group<S: AsRef<str>>(
        &self,
        batch: &Arc<Batch>,
        targets: &[S],
        transfers: &[Transfer],
        group: &[usize],
        slots: &mut [Slot],
    ) {
        let fail_all = |slots: &mut [Slot], e: &Error| {
            for &i in group {
                slots[i] = Slot::Failed(e.clone());
            }
        };
        let Some(name) = targets.get(transfers[group[0]].target) else {
            fail_all(slots, &Error::InvalidArgument("transfer names no target segment".into()));
            return;
        };
        let handle = match self.open_segment(name.as_ref()) {
            Ok(h) => h,
            Err(e) => return fail_all(slots, &e),
        };
        let request = |i: usize| TransferRequest {
            opcode: transfers[i].opcode,
            local_addr: transfers[i].local_addr,
            target: handle,
            remote_addr: transfers[i].remote_addr,
            length: transfers[i].length,
        };
        let all: Vec<TransferRequest> = group.iter().map(|&i| request(i)).collect();
        let start = batch.len();
        match self.submit_into(batch, &all) {
            Ok(()) => {
                for (k, &i) in group.iter().enumerate() {
                    slots[i] = Slot::Batch(start + k);
                }
            }
            Err(e) if group.len() > 1 && !e.is_peer_unreachable() => {
                for &i in group {
                    let start = batch.len();
                    slots[i] = match self.submit_into(batch, &[request(i)]) {
                        Ok(()) => Slot::Batch(start),
                        Err(e) => Slot::Failed(e),
                    };
                }
            }
            Err(e) => fail_all(slots, &e),
        }
    }

    /// Runs transfers to one segment with one opcode through the caller-thread path. When the engine rejects
    /// them as a whole (say one bad range), each runs alone so that only the bad one fails, unless the peer
    /// itself is unreachable.
    fn run_deferred(&self, name: &str, transfers: &[Transfer]) -> Vec<Result<()>> {
        let opcode = transfers[0].opcode;
        let locals: Vec<u64> = transfers.iter().map(|t| t.local_addr).collect();
        let remotes: Vec<u64> = transfers.iter().map(|t| t.remote_addr).collect();
        let lengths: Vec<u64> = transfers.iter().map(|t| t.length).collect();
        match self.batch_transfer_sync_each(name, opcode, &locals, &remotes, &lengths) {
            Ok(results) => results,
            Err(e) if transfers.len() > 1 && !e.is_peer_unreachable() => transfers
                .iter()
                .map(|t| self.batch_transfer_sync(name, opcode, &[t.local_addr], &[t.remote_addr], &[t.length]))
                .collect(),
            Err(e) => vec![Err(e); transfers.len()],
        }
    }
}

impl PendingTransfers {
    /// Waits for every transfer, bounded by the engine's sync timeout for the bytes moved (unfinished transfers
    /// fail with `Timeout`); one result per transfer, in the order given to `start_transfers`.
    pub fn wait(self) -> Vec<Result<()>> {
        if let Some((name, transfers)) = &self.deferred {
            return self.engine.run_deferred(name, transfers);
        }
        if let Some(batch) = &self.batch {
            if !batch.is_empty() {
                // A timeout marks the unfinished requests; their statuses say so below.
                let _ = batch.wait_blocking(self.engine.sync_timeout(self.bytes));
            }
        }
        let batch = self.batch;
        self.slots
            .into_iter()
            .map(|slot| match slot {
                Slot::Failed(e) => Err(e),
                Slot::Batch(i) => batch.as_ref().map_or(Err(Error::Canceled), |b| b.result(i).map(drop)),
            })
            .collect()
    }
}
