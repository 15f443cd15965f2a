//! Gets: `GetReplicaList` for every key in one RPC, then rounds of transfers in one engine batch each. Every
//! key reads its first untried complete replica (our own segment first, by memcpy; then the master's order);
//! keys whose transfer failed try their next replica in the next round. An endpoint that fails at the
//! connection level is reported to the master and skipped for the rest of the call.
//!
//! The master grants a lease with the replica list; bytes read after it ran out may be torn (the space can be
//! reused), so a read that finishes later than `lease` after the request was sent fails with `LeaseExpired`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use mooncake_core::{MemoryKind, Opcode, RegionGuard, Transfer};

use super::errors;
use super::lifecycle::Inner;
use super::local_copy;
use super::master::{per_key, wrong_kind};
use super::staging::Scratch;
use crate::error::{Error, Result};
use crate::protocol::{Request, Response};
use crate::types::{ErrorCode, ReplicaDescriptor, ReplicaStatus};

/// Where one object's bytes go.
pub(crate) enum Dest {
    /// A new `Vec` (bytes API; remote replicas are read through staging memory).
    Owned,
    /// `(address, length)` parts inside buffers registered with `register_buffer`, filled in order.
    Raw(Vec<(u64, u64)>),
}

/// One key's read: its size and, for [`Dest::Owned`], the bytes.
pub(crate) type ReadResult = Result<(u64, Option<Vec<u8>>)>;

struct Job<'a> {
    key: &'a str,
    dest: Dest,
    capacity: u64,
    host: bool,
    _guards: Vec<RegionGuard>,
    result: Option<ReadResult>,
    candidates: Vec<ReplicaDescriptor>,
    next: usize,
    size: u64,
    staged: Option<u64>,
    last_error: Option<Error>,
}

impl Inner {
    /// Reads every key into its destination; one result per key.
    pub(crate) fn read_many<K: AsRef<str>>(&self, keys: &[K], dests: Vec<Dest>) -> Vec<ReadResult> {
        let regions = self.engine.regions();
        let mut jobs: Vec<Job<'_>> = keys
            .iter()
            .zip(dests)
            .map(|(key, dest)| {
                let mut job = Job {
                    key: key.as_ref(),
                    dest,
                    capacity: u64::MAX,
                    host: true,
                    _guards: Vec::new(),
                    result: None,
                    candidates: Vec::new(),
                    next: 0,
                    size: 0,
                    staged: None,
                    last_error: None,
                };
                if let Err(e) = validate(&mut job, self) {
                    job.result = Some(Err(e));
                }
                job
            })
            .collect();
        let asked: Vec<usize> = (0..jobs.len()).filter(|&i| jobs[i].result.is_none()).collect();
        if asked.is_empty() {
            return finish(jobs);
        }

        // One GetReplicaList for every valid key. The lease runs from the master's clock at the grant, which is
        // after this instant: measuring from here is conservative.
        let sent = Instant::now();
        let request = Request::GetReplicaList { keys: asked.iter().map(|&i| jobs[i].key.to_string()).collect() };
        let lists = match self.master.call(&request) {
            Ok(Response::Replicas(v)) => per_key(request.name(), asked.len(), v),
            Ok(other) => vec![Err(wrong_kind(request.name(), &other)); asked.len()],
            Err(e) => vec![Err(e); asked.len()],
        };
        let mut lease = Duration::MAX;
        for (&i, r) in asked.iter().zip(lists) {
            let job = &mut jobs[i];
            let (replicas, lease_ms) = match r {
                Ok(list) => list,
                Err(e) => {
                    job.result = Some(Err(e));
                    continue;
                }
            };
            lease = lease.min(Duration::from_millis(lease_ms));
            let mut candidates: Vec<ReplicaDescriptor> =
                replicas.into_iter().filter(|r| r.status == ReplicaStatus::Complete).collect();
            // Our own segment first (stable: the master's order otherwise).
            candidates.sort_by_key(|r| self.own_addr(r).is_none());
            let Some(size) = candidates.first().map(|r| r.len) else {
                job.result = Some(Err(ErrorCode::UnavailableInCurrentStatus.into()));
                continue;
            };
            if candidates.iter().any(|r| r.len != size) {
                tracing::error!(key = job.key, ?candidates, "replicas of one object disagree on its size");
                job.result = Some(Err(ErrorCode::Internal.into()));
                continue;
            }
            if size > job.capacity {
                job.result = Some(Err(ErrorCode::BufferOverflow.into()));
                continue;
            }
            job.size = size;
            job.candidates = candidates;
            if size == 0 {
                let bytes = matches!(job.dest, Dest::Owned).then(Vec::new);
                job.result = Some(Ok((0, bytes)));
            }
        }

        // Staging for values read from a remote replica into a new Vec.
        let mut scratch = Scratch::new(self.staging.as_ref(), &self.engine, &self.device);
        let needs_staging: Vec<usize> = (0..jobs.len())
            .filter(|&i| {
                let job = &jobs[i];
                job.result.is_none()
                    && matches!(job.dest, Dest::Owned)
                    && job.candidates.iter().any(|r| self.own_addr(r).is_none())
            })
            .collect();
        if !needs_staging.is_empty() {
            let lens: Vec<u64> = needs_staging.iter().map(|&i| jobs[i].size).collect();
            for (&i, addr) in needs_staging.iter().zip(scratch.reserve(&lens)) {
                jobs[i].staged = addr;
            }
        }

        let mut dead: HashSet<String> = HashSet::new();
        loop {
            let round = self.plan_round(&mut jobs, &dead);
            if round.xfers.is_empty() && round.local.is_empty() {
                break;
            }
            let in_flight = self.engine.start_transfers(&round.endpoints, &round.xfers);
            for &(i, replica_addr) in &round.local {
                let job = &mut jobs[i];
                let copied = match &job.dest {
                    Dest::Owned => {
                        let mut out = Vec::new();
                        local_copy::append_to_vec(regions, replica_addr, job.size, &mut out).map(|()| Some(out))
                    }
                    Dest::Raw(parts) => pieces(parts, job.size)
                        .try_for_each(|(ptr, off, len)| {
                            local_copy::copy_registered(regions, replica_addr + off, ptr, len)
                        })
                        .map(|()| None),
                };
                match copied {
                    Ok(bytes) => job.result = Some(Ok((job.size, bytes))),
                    Err(e) => {
                        tracing::error!(key = job.key, error = %e, "cannot copy a value from our own segment");
                        job.last_error = Some(ErrorCode::TransferFail.into());
                    }
                }
            }
            let mut failed: HashSet<usize> = HashSet::new();
            for (k, r) in in_flight.wait().into_iter().enumerate() {
                let Err(e) = r else { continue };
                let i = round.owners[k];
                let endpoint = &round.endpoints[round.xfers[k].target];
                if failed.insert(i) {
                    let what = format!("reading {:?} from {endpoint} failed", jobs[i].key);
                    jobs[i].last_error = Some(errors::engine(&what, &e));
                }
                if e.is_peer_unreachable() && dead.insert(endpoint.clone()) {
                    self.report_unreachable(endpoint);
                }
            }
            for &i in &round.remote_jobs {
                if failed.contains(&i) {
                    continue;
                }
                let job = &mut jobs[i];
                job.result = Some(match (&job.dest, job.staged) {
                    (Dest::Owned, Some(addr)) => {
                        let mut out = Vec::new();
                        local_copy::append_to_vec(regions, addr, job.size, &mut out).map(|()| (job.size, Some(out)))
                    }
                    (Dest::Owned, None) => Err(ErrorCode::Internal.into()),
                    (Dest::Raw(_), _) => Ok((job.size, None)),
                });
            }
        }
        drop(scratch);

        if sent.elapsed() >= lease {
            for job in &mut jobs {
                if matches!(job.result, Some(Ok(_))) && !job.candidates.is_empty() {
                    tracing::warn!(
                        key = job.key,
                        ?lease,
                        "read finished after the lease ran out; the bytes may be torn"
                    );
                    job.result = Some(Err(ErrorCode::LeaseExpired.into()));
                }
            }
        }
        finish(jobs)
    }

    /// Picks each pending key's next replica: memcpy from our own segment, or transfers (the staging slice or
    /// the caller's buffers as local memory). Keys with no replica left fail with their last error.
    fn plan_round(&self, jobs: &mut [Job<'_>], dead: &HashSet<String>) -> Round {
        let mut round = Round::default();
        let mut endpoint_index: HashMap<String, usize> = HashMap::new();
        for (i, job) in jobs.iter_mut().enumerate() {
            if job.result.is_some() {
                continue;
            }
            let pick =
                (job.next..job.candidates.len()).find(|&c| !dead.contains(&job.candidates[c].transport_endpoint));
            let Some(c) = pick else {
                job.result =
                    Some(Err(job.last_error.take().unwrap_or_else(|| ErrorCode::UnavailableInCurrentStatus.into())));
                continue;
            };
            job.next = c + 1;
            let r = &job.candidates[c];
            let memcpy_ok = matches!(job.dest, Dest::Owned) || job.host;
            if let Some(addr) = self.own_addr(r).filter(|_| memcpy_ok) {
                round.local.push((i, addr));
                continue;
            }
            let endpoint = *endpoint_index.entry(r.transport_endpoint.clone()).or_insert_with(|| {
                round.endpoints.push(r.transport_endpoint.clone());
                round.endpoints.len() - 1
            });
            let replica_addr = r.addr;
            match &job.dest {
                Dest::Owned => match job.staged {
                    Some(addr) => {
                        round.xfers.push(Transfer {
                            target: endpoint,
                            opcode: Opcode::Read,
                            local_addr: addr,
                            remote_addr: replica_addr,
                            length: job.size,
                        });
                        round.owners.push(i);
                    }
                    None => {
                        // No registered memory to read into: no replica can be read.
                        job.result = Some(Err(ErrorCode::TransferFail.into()));
                        continue;
                    }
                },
                Dest::Raw(parts) => {
                    for (ptr, off, len) in pieces(parts, job.size) {
                        round.xfers.push(Transfer {
                            target: endpoint,
                            opcode: Opcode::Read,
                            local_addr: ptr,
                            remote_addr: replica_addr + off,
                            length: len,
                        });
                        round.owners.push(i);
                    }
                }
            }
            round.remote_jobs.push(i);
        }
        round
    }
}

/// The work of one round.
#[derive(Default)]
struct Round {
    endpoints: Vec<String>,
    xfers: Vec<Transfer>,
    /// The job of each transfer.
    owners: Vec<usize>,
    /// Jobs served from memory this process holds: (job, the replica's address here).
    local: Vec<(usize, u64)>,
    /// Jobs with transfers this round.
    remote_jobs: Vec<usize>,
}

/// Splits the first `size` bytes of an object over `parts`: `(local address, object offset, length)`.
fn pieces(parts: &[(u64, u64)], size: u64) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
    let mut off = 0u64;
    parts.iter().map_while(move |&(ptr, len)| {
        let n = len.min(size - off);
        if n == 0 {
            return None;
        }
        let piece = (ptr, off, n);
        off += n;
        Some(piece)
    })
}

/// Checks a job's key and destination, computes its capacity and pins the caller's registrations.
fn validate(job: &mut Job<'_>, client: &Inner) -> Result<()> {
    if job.key.is_empty() {
        return Err(ErrorCode::InvalidKey.into());
    }
    if let Dest::Raw(parts) = &job.dest {
        if parts.is_empty() {
            return Err(ErrorCode::InvalidParams.into());
        }
        let mut capacity: u64 = 0;
        for &(ptr, len) in parts {
            let guard = client.user_region(ptr, len)?;
            job.host &= guard.location.kind() == Some(MemoryKind::Host);
            job._guards.push(guard);
            capacity = capacity.checked_add(len).ok_or(ErrorCode::InvalidParams)?;
        }
        job.capacity = capacity;
    }
    Ok(())
}

fn finish(jobs: Vec<Job<'_>>) -> Vec<ReadResult> {
    jobs.into_iter().map(|j| j.result.unwrap_or(Err(ErrorCode::Internal.into()))).collect()
}

#[cfg(test)]
mod tests {
    use super::pieces;

    #[test]
    fn pieces_cover_the_object_in_order() {
        let parts = [(100, 4), (200, 4), (300, 10)];
        assert_eq!(pieces(&parts, 6).collect::<Vec<_>>(), vec![(100, 0, 4), (200, 4, 2)]);
        assert_eq!(pieces(&parts, 18).collect::<Vec<_>>(), vec![(100, 0, 4), (200, 4, 4), (300, 8, 10)]);
        assert_eq!(pieces(&parts, 0).count(), 0);
    }
}
