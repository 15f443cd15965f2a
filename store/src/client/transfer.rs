//! Runs the transfers of one call as one engine batch, with one result per transfer.
//!
//! Requests are grouped by target segment (one submission per segment, so the transports see runs of requests
//! to the same peer). A segment that cannot be opened, or a submission the engine rejects, fails only its own
//! requests; a rejected group of several requests is retried one request at a time unless the peer is
//! unreachable, so one bad request does not fail its neighbours. Waiting is bounded by the engine's sync
//! timeout (`MC_TRANSFER_TIMEOUT` plus 1 ns per byte); unfinished requests then fail with a timeout. A call
//! whose requests all go to one segment with one opcode and move at most [`SYNC_MAX_BYTES`] (a small get or put,
//! or a small batch from one node) uses the engine's blocking path instead, run at `wait`, which transports may
//! run on the calling thread (TCP does, pipelining a batch on one connection). Larger calls are submitted at
//! once, so their transfers overlap the memcpy of replicas in this process that the caller does before `wait`.

use std::sync::Arc;

use mooncake_core::{Batch, Error, Opcode, TransferEngine, TransferRequest, TransferState};

use super::errors::is_connection_level;

/// Most bytes a call may move through the engine's blocking path (run at `wait`, after the caller's local
/// copies): small calls gain from the caller-thread path, large ones from overlapping the transfers with those
/// copies.
const SYNC_MAX_BYTES: u64 = 1 << 20;

/// One transfer between local registered memory and a replica.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Xfer {
    /// Index into the call's endpoint list.
    pub(crate) endpoint: usize,
    /// Read (replica to local) or write (local to replica).
    pub(crate) opcode: Opcode,
    /// Local address.
    pub(crate) local: u64,
    /// Address in the replica owner's process.
    pub(crate) remote: u64,
    /// Bytes.
    pub(crate) len: u64,
}

enum Slot {
    Batch(usize),
    Failed(Error),
}

/// Transfers submitted and not yet waited for.
pub(crate) struct InFlight {
    batch: Option<Arc<Batch>>,
    slots: Vec<Slot>,
    /// Requests to one segment with one opcode, run at `wait` through the engine's blocking path.
    sync: Option<(String, Vec<Xfer>)>,
    bytes: u64,
}

/// Submits `reqs` (targets named by `endpoints`). Nothing blocks on the transfers themselves.
pub(crate) fn submit(engine: &TransferEngine, endpoints: &[String], reqs: &[Xfer]) -> InFlight {
    let bytes = reqs.iter().fold(0u64, |acc, r| acc.saturating_add(r.len));
    if let Some(first) = reqs.first() {
        let alike = reqs.iter().all(|r| r.endpoint == first.endpoint && r.opcode == first.opcode);
        if let (true, true, Some(name)) = (alike, bytes <= SYNC_MAX_BYTES, endpoints.get(first.endpoint)) {
            return InFlight { batch: None, slots: Vec::new(), sync: Some((name.clone(), reqs.to_vec())), bytes };
        }
    }
    let mut slots: Vec<Slot> = (0..reqs.len()).map(|_| Slot::Failed(Error::Canceled)).collect();
    if reqs.is_empty() {
        return InFlight { batch: None, slots, sync: None, bytes };
    }
    let batch = Batch::new(reqs.len());
    let mut order: Vec<usize> = (0..reqs.len()).collect();
    order.sort_by_key(|&i| reqs[i].endpoint);
    for group in order.chunk_by(|&a, &b| reqs[a].endpoint == reqs[b].endpoint) {
        let Some(name) = endpoints.get(reqs[group[0]].endpoint) else {
            for &i in group {
                slots[i] = Slot::Failed(Error::InvalidArgument("transfer names no endpoint".into()));
            }
            continue;
        };
        let handle = match engine.open_segment(name) {
            Ok(h) => h,
            Err(e) => {
                for &i in group {
                    slots[i] = Slot::Failed(e.clone());
                }
                continue;
            }
        };
        let request = |i: usize| TransferRequest {
            opcode: reqs[i].opcode,
            source: reqs[i].local,
            target_id: handle,
            target_offset: reqs[i].remote,
            length: reqs[i].len,
        };
        let all: Vec<TransferRequest> = group.iter().map(|&i| request(i)).collect();
        let start = batch.len();
        match engine.submit_into(&batch, &all) {
            Ok(()) => {
                for (k, &i) in group.iter().enumerate() {
                    slots[i] = Slot::Batch(start + k);
                }
            }
            Err(e) if group.len() > 1 && !is_connection_level(&e) => {
                for &i in group {
                    let start = batch.len();
                    slots[i] = match engine.submit_into(&batch, &[request(i)]) {
                        Ok(()) => Slot::Batch(start),
                        Err(e) => Slot::Failed(e),
                    };
                }
            }
            Err(e) => {
                for &i in group {
                    slots[i] = Slot::Failed(e.clone());
                }
            }
        }
    }
    InFlight { batch: Some(batch), slots, sync: None, bytes }
}

impl InFlight {
    /// Waits for every transfer (bounded by the engine's sync timeout); one result per request, in order.
    pub(crate) fn wait(self, engine: &TransferEngine) -> Vec<Result<(), Error>> {
        if let Some((name, reqs)) = self.sync {
            return run_sync(engine, &name, &reqs);
        }
        if let Some(batch) = &self.batch {
            if !batch.is_empty() {
                // A timeout marks the unfinished requests; their statuses say so below.
                let _ = batch.wait_blocking(engine.sync_timeout(self.bytes));
            }
        }
        self.slots
            .into_iter()
            .map(|slot| match slot {
                Slot::Failed(e) => Err(e),
                Slot::Batch(i) => match self.batch.as_ref().map(|b| b.status(i)) {
                    Some(Ok(s)) if s.state == TransferState::Completed => Ok(()),
                    Some(Ok(s)) => {
                        Err(s.error.unwrap_or_else(|| Error::Protocol(format!("transfer ended {:?}", s.state))))
                    }
                    Some(Err(e)) => Err(e),
                    None => Err(Error::Canceled),
                },
            })
            .collect()
    }
}

/// Runs requests to one segment with one opcode through the engine's blocking path. When the engine rejects
/// the group as a whole (say one bad range), each request is run alone so that only the bad one fails, unless
/// the peer itself is unreachable.
fn run_sync(engine: &TransferEngine, name: &str, reqs: &[Xfer]) -> Vec<Result<(), Error>> {
    let opcode = reqs[0].opcode;
    let locals: Vec<u64> = reqs.iter().map(|r| r.local).collect();
    let remotes: Vec<u64> = reqs.iter().map(|r| r.remote).collect();
    let lens: Vec<u64> = reqs.iter().map(|r| r.len).collect();
    match engine.batch_transfer_sync_each(name, opcode, &locals, &remotes, &lens) {
        Ok(results) => results,
        Err(e) if reqs.len() > 1 && !is_connection_level(&e) => {
            reqs.iter().map(|r| engine.batch_transfer_sync(name, opcode, &[r.local], &[r.remote], &[r.len])).collect()
        }
        Err(e) => vec![Err(e); reqs.len()],
    }
}
