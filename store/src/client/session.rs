//! Put and get sessions: reserve objects now and fill them range by range later, or look replicas up once and
//! read many ranges of them.
//!
//! A put session is a `PutStart` whose bytes come later: [`Inner::put_session_start`] reserves the replicas
//! (the objects are not readable yet), [`Inner::write_ranges`] writes byte ranges from registered buffers into
//! every replica, and [`Inner::put_session_end`] (`PutEnd`) makes the objects readable, or
//! [`Inner::put_session_revoke`] (`PutRevoke`) gives the space back. A get session caches each object's
//! complete replicas and size ([`Inner::get_session_start`]) so that [`Inner::read_ranges`] costs no master
//! round trip; an entry whose lease has run out is looked up again before it is read, so a session never reads
//! memory the master may have handed to another object.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mooncake_core::sync::lock;
use mooncake_core::{MemoryKind, Opcode, RegionGuard, Transfer};

use super::errors;
use super::lifecycle::Inner;
use super::local_copy;
use super::master::{per_key, wrong_kind};
use crate::error::{Error, Result};
use crate::protocol::{Request, Response};
use crate::types::{ErrorCode, ReplicaDescriptor, ReplicaStatus, ReplicateConfig};

/// Objects of open put sessions and replicas cached by get sessions, by key.
#[derive(Default)]
pub(crate) struct Sessions {
    puts: Mutex<HashMap<String, Vec<ReplicaDescriptor>>>,
    gets: Mutex<HashMap<String, Cached>>,
}

/// A get session's view of one object.
#[derive(Clone)]
struct Cached {
    /// Complete replicas, ours first.
    replicas: Vec<ReplicaDescriptor>,
    size: u64,
    /// When the lease granted with the lookup runs out (measured from before the request: conservative).
    expires: Instant,
}

/// One key's ranges: `(address in a registered buffer, length, offset in the object)`.
pub type Ranges = Vec<(u64, u64, u64)>;

impl Inner {
    /// Reserves `(key, size)` objects without writing them. One result per key; a size of 0, or a key whose
    /// session is already open here, is `InvalidParams`; an existing key `ObjectAlreadyExists`.
    pub(crate) fn put_session_start(
        &self,
        keys: &[String],
        sizes: &[u64],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        if keys.len() != sizes.len() {
            return vec![Err(ErrorCode::InvalidParams.into()); keys.len()];
        }
        let open: Vec<bool> = {
            let puts = lock(&self.sessions.puts);
            keys.iter().map(|k| puts.contains_key(k)).collect()
        };
        let mut results: Vec<Option<Result<()>>> = keys
            .iter()
            .zip(sizes)
            .zip(open)
            .map(|((k, &s), open)| {
                if k.is_empty() {
                    Some(Err(ErrorCode::InvalidKey.into()))
                } else if open || s == 0 || s > isize::MAX as u64 {
                    Some(Err(ErrorCode::InvalidParams.into()))
                } else {
                    None
                }
            })
            .collect();
        let asked: Vec<usize> = (0..keys.len()).filter(|&i| results[i].is_none()).collect();
        if !asked.is_empty() {
            let items = asked.iter().map(|&i| (keys[i].clone(), sizes[i])).collect();
            let request = Request::PutStart { client: self.id, items, config: config.clone(), upsert: false };
            let placed = match self.master.call(&request) {
                Ok(Response::Placed(v)) => per_key(request.name(), asked.len(), v),
                Ok(other) => vec![Err(wrong_kind(request.name(), &other)); asked.len()],
                Err(e) => vec![Err(e); asked.len()],
            };
            let mut puts = lock(&self.sessions.puts);
            for (&i, r) in asked.iter().zip(placed) {
                results[i] = Some(match r {
                    Ok(replicas) if !replicas.is_empty() && replicas.iter().all(|r| r.len == sizes[i]) => {
                        puts.insert(keys[i].clone(), replicas);
                        Ok(())
                    }
                    Ok(replicas) => {
                        tracing::error!(key = keys[i], ?replicas, "the master placed replicas of the wrong size");
                        puts.insert(keys[i].clone(), replicas);
                        Err(ErrorCode::Internal.into())
                    }
                    Err(e) => Err(e),
                });
            }
        }
        results.into_iter().map(|r| r.unwrap_or(Err(ErrorCode::Internal.into()))).collect()
    }

    /// Ends put sessions: `PutEnd` (the objects become readable) or, with `revoke`, `PutRevoke`. A key with no
    /// open session is `InvalidParams`.
    pub(crate) fn put_session_finish(&self, keys: &[String], revoke: bool) -> Vec<Result<()>> {
        let mut results: Vec<Option<Result<()>>> = vec![None; keys.len()];
        {
            let mut puts = lock(&self.sessions.puts);
            for (i, k) in keys.iter().enumerate() {
                if puts.remove(k).is_none() {
                    results[i] = Some(Err(ErrorCode::InvalidParams.into()));
                }
            }
        }
        let asked: Vec<usize> = (0..keys.len()).filter(|&i| results[i].is_none()).collect();
        if !asked.is_empty() {
            let names = asked.iter().map(|&i| keys[i].clone()).collect();
            let request = if revoke {
                Request::PutRevoke { client: self.id, keys: names }
            } else {
                Request::PutEnd { client: self.id, keys: names }
            };
            let ended = match self.master.call(&request) {
                Ok(Response::PerKey(v)) => per_key(request.name(), asked.len(), v),
                Ok(other) => vec![Err(wrong_kind(request.name(), &other)); asked.len()],
                Err(e) => vec![Err(e); asked.len()],
            };
            for (&i, r) in asked.iter().zip(ended) {
                results[i] = Some(r);
            }
        }
        results.into_iter().map(|r| r.unwrap_or(Err(ErrorCode::Internal.into()))).collect()
    }

    /// Writes each key's ranges into every replica its put session reserved. Bytes written per key; a key with
    /// no open session, or a range outside the object or outside registered memory, is `InvalidParams`.
    pub(crate) fn write_ranges(&self, keys: &[String], ranges: &[Ranges]) -> Vec<Result<u64>> {
        if keys.len() != ranges.len() {
            return vec![Err(ErrorCode::InvalidParams.into()); keys.len()];
        }
        let targets: Vec<Option<Vec<ReplicaDescriptor>>> = {
            let puts = lock(&self.sessions.puts);
            keys.iter().map(|k| puts.get(k).cloned()).collect()
        };
        let jobs = targets
            .into_iter()
            .zip(ranges)
            .map(|(replicas, r)| match replicas {
                Some(replicas) => {
                    let size = replicas.first().map_or(0, |r| r.len);
                    RangeJob::new(self, replicas, size, r)
                }
                None => RangeJob::failed(ErrorCode::InvalidParams.into()),
            })
            .collect();
        self.move_ranges(Opcode::Write, keys, jobs)
    }

    /// Looks up each key's complete replicas once and caches them for [`Inner::read_ranges`]. One result per
    /// key (`ObjectNotFound` for a missing key).
    pub(crate) fn get_session_start(&self, keys: &[String]) -> Vec<Result<()>> {
        let looked_up = self.look_up(keys);
        let mut gets = lock(&self.sessions.gets);
        keys.iter()
            .zip(looked_up)
            .map(|(k, r)| {
                r.map(|cached| {
                    gets.insert(k.clone(), cached);
                })
            })
            .collect()
    }

    /// Drops what get sessions cached for `keys` (keys without one are ignored).
    pub(crate) fn get_session_end(&self, keys: &[String]) {
        let mut gets = lock(&self.sessions.gets);
        for k in keys {
            gets.remove(k);
        }
    }

    /// Reads each key's ranges (from the replicas its get session cached) into registered buffers. Bytes read
    /// per key; a key with no session, or a range outside the object or outside registered memory, is
    /// `InvalidParams`.
    pub(crate) fn read_ranges(&self, keys: &[String], ranges: &[Ranges]) -> Vec<Result<u64>> {
        if keys.len() != ranges.len() {
            return vec![Err(ErrorCode::InvalidParams.into()); keys.len()];
        }
        let now = Instant::now();
        let mut cached: Vec<Option<Cached>> = {
            let gets = lock(&self.sessions.gets);
            keys.iter().map(|k| gets.get(k).cloned()).collect()
        };
        // Entries whose lease ran out: look them up again (the object may have moved or gone).
        let stale: Vec<usize> =
            (0..keys.len()).filter(|&i| cached[i].as_ref().is_some_and(|c| c.expires <= now)).collect();
        let mut failed: HashMap<usize, Error> = HashMap::new();
        if !stale.is_empty() {
            let names: Vec<String> = stale.iter().map(|&i| keys[i].clone()).collect();
            let fresh = self.look_up(&names);
            let mut gets = lock(&self.sessions.gets);
            for (&i, r) in stale.iter().zip(fresh) {
                match r {
                    Ok(c) => {
                        gets.insert(keys[i].clone(), c.clone());
                        cached[i] = Some(c);
                    }
                    Err(e) => {
                        gets.remove(&keys[i]);
                        failed.insert(i, e);
                    }
                }
            }
        }
        let jobs = cached
            .into_iter()
            .zip(ranges)
            .enumerate()
            .map(|(i, (c, r))| match (failed.get(&i), c) {
                (Some(e), _) => RangeJob::failed(e.clone()),
                (None, Some(c)) => RangeJob::new(self, c.replicas, c.size, r),
                (None, None) => RangeJob::failed(ErrorCode::InvalidParams.into()),
            })
            .collect();
        self.move_ranges(Opcode::Read, keys, jobs)
    }

    /// Complete replicas (ours first), size and lease end of each key.
    fn look_up(&self, keys: &[String]) -> Vec<Result<Cached>> {
        if keys.is_empty() {
            return Vec::new();
        }
        let sent = Instant::now();
        let request = Request::GetReplicaList { keys: keys.to_vec() };
        let lists = match self.master.call(&request) {
            Ok(Response::Replicas(v)) => per_key(request.name(), keys.len(), v),
            Ok(other) => vec![Err(wrong_kind(request.name(), &other)); keys.len()],
            Err(e) => vec![Err(e); keys.len()],
        };
        lists
            .into_iter()
            .map(|r| {
                let (replicas, lease_ms) = r?;
                let mut replicas: Vec<ReplicaDescriptor> =
                    replicas.into_iter().filter(|r| r.status == ReplicaStatus::Complete).collect();
                replicas.sort_by_key(|r| self.own_addr(r).is_none());
                let size = replicas.first().map(|r| r.len).ok_or(ErrorCode::UnavailableInCurrentStatus)?;
                if replicas.iter().any(|r| r.len != size) {
                    tracing::error!(?replicas, "replicas of one object disagree on its size");
                    return Err(ErrorCode::Internal.into());
                }
                Ok(Cached { replicas, size, expires: sent + Duration::from_millis(lease_ms) })
            })
            .collect()
    }

    /// Moves every job's ranges: writes go to every replica, reads come from the first replica that works
    /// (ours by memcpy, others through the engine; a failed replica is skipped for the next).
    fn move_ranges(&self, opcode: Opcode, keys: &[String], mut jobs: Vec<RangeJob>) -> Vec<Result<u64>> {
        let regions = self.engine.regions();
        loop {
            // This round: writes touch every replica once; reads try each job's next replica.
            let mut endpoints: Vec<String> = Vec::new();
            let mut endpoint_index: HashMap<String, usize> = HashMap::new();
            let mut xfers: Vec<Transfer> = Vec::new();
            let mut owners: Vec<usize> = Vec::new();
            let mut active = Vec::new();
            for (j, job) in jobs.iter_mut().enumerate() {
                if job.done() {
                    continue;
                }
                let replicas: Vec<ReplicaDescriptor> = match opcode {
                    Opcode::Write => std::mem::take(&mut job.replicas),
                    Opcode::Read => vec![job.replicas[job.next].clone()],
                };
                job.next += 1;
                job.round_error = None;
                active.push(j);
                for r in replicas {
                    if let Some(here) = self.own_addr(&r).filter(|_| job.host) {
                        for &(ptr, len, off) in &job.ranges {
                            let (src, dst) = match opcode {
                                Opcode::Write => (ptr, here + off),
                                Opcode::Read => (here + off, ptr),
                            };
                            if let Err(e) = local_copy::copy_registered(regions, src, dst, len) {
                                tracing::error!(key = keys[j], error = %e, "cannot copy a range in this process");
                                job.round_error.get_or_insert_with(|| ErrorCode::TransferFail.into());
                            }
                        }
                        continue;
                    }
                    let endpoint = *endpoint_index.entry(r.transport_endpoint.clone()).or_insert_with(|| {
                        endpoints.push(r.transport_endpoint.clone());
                        endpoints.len() - 1
                    });
                    for &(ptr, len, off) in &job.ranges {
                        xfers.push(Transfer {
                            target: endpoint,
                            opcode,
                            local_addr: ptr,
                            remote_addr: r.addr + off,
                            length: len,
                        });
                        owners.push(j);
                    }
                }
            }
            if active.is_empty() {
                break;
            }
            let results = self.engine.run_transfers(&endpoints, &xfers);
            for (k, r) in results.into_iter().enumerate() {
                let Err(e) = r else { continue };
                let endpoint = &endpoints[xfers[k].target];
                let job = &mut jobs[owners[k]];
                if job.round_error.is_none() {
                    job.round_error =
                        Some(errors::engine(&format!("ranges of {:?} via {endpoint}", keys[owners[k]]), &e));
                }
                if e.is_peer_unreachable() {
                    self.report_unreachable(endpoint);
                }
            }
            for j in active {
                let job = &mut jobs[j];
                match (job.round_error.take(), opcode) {
                    (None, _) => job.result = Some(Ok(job.bytes)),
                    (Some(e), Opcode::Write) => job.result = Some(Err(e)),
                    (Some(e), Opcode::Read) if job.next >= job.replicas.len() => job.result = Some(Err(e)),
                    (Some(_), Opcode::Read) => {}
                }
            }
        }
        jobs.into_iter().map(|j| j.result.unwrap_or(Err(ErrorCode::Internal.into()))).collect()
    }
}

/// One key's part of a ranged call.
struct RangeJob {
    replicas: Vec<ReplicaDescriptor>,
    ranges: Ranges,
    /// Every range lies in host memory (memcpy to or from our own segment is possible).
    host: bool,
    bytes: u64,
    /// Next replica to read from.
    next: usize,
    round_error: Option<Error>,
    result: Option<Result<u64>>,
    /// Keeps the caller's registrations alive until the call ends.
    _guards: Vec<RegionGuard>,
}

impl RangeJob {
    fn failed(e: Error) -> RangeJob {
        RangeJob {
            replicas: Vec::new(),
            ranges: Vec::new(),
            host: true,
            bytes: 0,
            next: 0,
            round_error: None,
            result: Some(Err(e)),
            _guards: Vec::new(),
        }
    }

    /// Checks `ranges` against the object's `size` and the caller's registrations.
    fn new(client: &Inner, replicas: Vec<ReplicaDescriptor>, size: u64, ranges: &Ranges) -> RangeJob {
        let mut job = RangeJob::failed(ErrorCode::InvalidParams.into());
        if ranges.is_empty() || replicas.is_empty() {
            return job;
        }
        let mut bytes: u64 = 0;
        for &(ptr, len, off) in ranges {
            if len == 0 || off.checked_add(len).is_none_or(|end| end > size) {
                return job;
            }
            match client.user_region(ptr, len) {
                Ok(guard) => {
                    job.host &= guard.location.kind() == Some(MemoryKind::Host);
                    job._guards.push(guard);
                }
                Err(e) => {
                    job.result = Some(Err(e));
                    return job;
                }
            }
            let Some(total) = bytes.checked_add(len) else { return job };
            bytes = total;
        }
        job.replicas = replicas;
        job.ranges = ranges.clone();
        job.bytes = bytes;
        job.result = None;
        job
    }

    fn done(&self) -> bool {
        self.result.is_some()
    }
}
