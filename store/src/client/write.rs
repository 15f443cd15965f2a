//! Puts and upserts: `PutStart` for every key in one RPC, every replica written in one engine batch (replicas on
//! our own segment copied with memcpy meanwhile), then `PutEnd` for the keys whose replicas all succeeded and
//! `PutRevoke` for the others.

use std::collections::HashMap;

use mooncake_core::{MemoryKind, Opcode, RegionGuard, Transfer};

use super::errors;
use super::lifecycle::Inner;
use super::local_copy;
use super::master::{per_key, wrong_kind};
use super::staging::Scratch;
use crate::error::{Error, Result};
use crate::protocol::{Request, Response};
use crate::types::{ErrorCode, ReplicaDescriptor, ReplicateConfig};

/// Where one object's bytes come from; the object is the concatenation of the parts.
pub(crate) enum Source<'a> {
    /// Rust slices (not registered: staged for remote replicas).
    Bytes(Vec<&'a [u8]>),
    /// `(address, length)` parts inside buffers registered with `register_buffer`.
    Raw(Vec<(u64, u64)>),
}

struct Job<'a> {
    key: &'a str,
    source: Source<'a>,
    len: u64,
    /// Every raw part is CPU-addressable host memory (memcpy to our own segment is possible).
    host: bool,
    /// Keeps the caller's registrations alive until the call ends.
    _guards: Vec<RegionGuard>,
    /// Final result, once decided.
    result: Option<Result<()>>,
    /// Replicas reserved by `PutStart`.
    replicas: Vec<ReplicaDescriptor>,
    /// Why writing the replicas failed.
    failure: Option<Error>,
    /// Staging address holding the bytes for remote replicas (bytes API).
    staged: Option<u64>,
}

impl Job<'_> {
    fn fail(&mut self, e: Error) {
        self.failure.get_or_insert(e);
    }
}

impl Inner {
    /// Writes every `(key, source)` pair; one result per key.
    pub(crate) fn write_many<K: AsRef<str>>(
        &self,
        keys: &[K],
        sources: Vec<Source<'_>>,
        config: &ReplicateConfig,
        upsert: bool,
    ) -> Vec<Result<()>> {
        let regions = self.engine.regions();
        let mut jobs: Vec<Job<'_>> = keys
            .iter()
            .zip(sources)
            .map(|(key, source)| {
                let mut job = Job {
                    key: key.as_ref(),
                    source,
                    len: 0,
                    host: true,
                    _guards: Vec::new(),
                    result: None,
                    replicas: Vec::new(),
                    failure: None,
                    staged: None,
                };
                if let Err(e) = validate(&mut job, self) {
                    job.result = Some(Err(e));
                }
                job
            })
            .collect();

        // One PutStart for every valid key.
        let started: Vec<usize> = (0..jobs.len()).filter(|&i| jobs[i].result.is_none()).collect();
        if started.is_empty() {
            return finish(jobs);
        }
        let items = started.iter().map(|&i| (jobs[i].key.to_string(), jobs[i].len)).collect();
        let request = Request::PutStart { client: self.id, items, config: config.clone(), upsert };
        let placed = match self.master.call(&request) {
            Ok(Response::Placed(v)) => per_key(request.name(), started.len(), v),
            Ok(other) => vec![Err(wrong_kind(request.name(), &other)); started.len()],
            Err(e) => vec![Err(e); started.len()],
        };
        let mut written = Vec::with_capacity(started.len());
        for (&i, r) in started.iter().zip(placed) {
            match r {
                Ok(replicas) if !replicas.is_empty() && replicas.iter().all(|r| r.len == jobs[i].len) => {
                    jobs[i].replicas = replicas;
                    written.push(i);
                }
                Ok(replicas) => {
                    tracing::error!(key = jobs[i].key, ?replicas, "the master placed replicas of the wrong size");
                    jobs[i].replicas = replicas;
                    jobs[i].fail(ErrorCode::Internal.into());
                    written.push(i);
                }
                Err(e) => jobs[i].result = Some(Err(e)),
            }
        }

        // Stage the bytes of slice values that go to remote replicas.
        let mut scratch = Scratch::new(self.staging.as_ref(), &self.engine, &self.device);
        let needs_staging: Vec<usize> = written
            .iter()
            .copied()
            .filter(|&i| {
                let job = &jobs[i];
                job.failure.is_none()
                    && matches!(job.source, Source::Bytes(_))
                    && job.replicas.iter().any(|r| self.own_addr(r).is_none())
            })
            .collect();
        if !needs_staging.is_empty() {
            let lens: Vec<u64> = needs_staging.iter().map(|&i| jobs[i].len).collect();
            for (&i, addr) in needs_staging.iter().zip(scratch.reserve(&lens)) {
                let job = &mut jobs[i];
                let Some(addr) = addr else {
                    job.fail(ErrorCode::TransferFail.into());
                    continue;
                };
                if let Source::Bytes(parts) = &job.source {
                    let mut off = 0;
                    for part in parts {
                        if let Err(e) = local_copy::copy_from_slice(regions, part, addr + off) {
                            tracing::error!(key = job.key, error = %e, "cannot copy a value into staging memory");
                            job.fail(ErrorCode::TransferFail.into());
                            break;
                        }
                        off += part.len() as u64;
                    }
                }
                job.staged = Some(addr);
            }
        }

        // Plan: remote replicas through the engine, our own by memcpy.
        let mut endpoints: Vec<String> = Vec::new();
        let mut endpoint_index: HashMap<String, usize> = HashMap::new();
        let mut xfers: Vec<Transfer> = Vec::new();
        let mut owners: Vec<usize> = Vec::new();
        let mut local: Vec<(usize, u64)> = Vec::new();
        let mut unstaged: Vec<usize> = Vec::new();
        for &i in &written {
            let job = &jobs[i];
            if job.failure.is_some() {
                continue;
            }
            for r in &job.replicas {
                let memcpy_ok = matches!(job.source, Source::Bytes(_)) || job.host;
                if let Some(addr) = self.own_addr(r).filter(|_| memcpy_ok) {
                    local.push((i, addr));
                    continue;
                }
                let endpoint = *endpoint_index.entry(r.transport_endpoint.clone()).or_insert_with(|| {
                    endpoints.push(r.transport_endpoint.clone());
                    endpoints.len() - 1
                });
                let mut push = |local_addr: u64, remote: u64, len: u64| {
                    xfers.push(Transfer {
                        target: endpoint,
                        opcode: Opcode::Write,
                        local_addr,
                        remote_addr: remote,
                        length: len,
                    });
                    owners.push(i);
                };
                match &job.source {
                    Source::Bytes(_) => match job.staged {
                        Some(addr) => push(addr, r.addr, job.len),
                        None => unstaged.push(i),
                    },
                    Source::Raw(parts) => {
                        let mut off = 0;
                        for &(ptr, len) in parts {
                            push(ptr, r.addr + off, len);
                            off += len;
                        }
                    }
                }
            }
        }
        for i in unstaged {
            tracing::error!(key = jobs[i].key, "a value for a remote replica was not staged");
            jobs[i].fail(ErrorCode::Internal.into());
        }
        let in_flight = self.engine.start_transfers(&endpoints, &xfers);
        for (i, dst) in local {
            let job = &mut jobs[i];
            let mut off = 0;
            let copied = match &job.source {
                Source::Bytes(parts) => parts.iter().try_for_each(|part| {
                    let r = local_copy::copy_from_slice(regions, part, dst + off);
                    off += part.len() as u64;
                    r
                }),
                Source::Raw(parts) => parts.iter().try_for_each(|&(ptr, len)| {
                    let r = local_copy::copy_registered(regions, ptr, dst + off, len);
                    off += len;
                    r
                }),
            };
            if let Err(e) = copied {
                tracing::error!(key = job.key, error = %e, "cannot copy a value into our own segment");
                job.fail(ErrorCode::TransferFail.into());
            }
        }
        for (k, r) in in_flight.wait().into_iter().enumerate() {
            let Err(e) = r else { continue };
            let job = &mut jobs[owners[k]];
            if job.failure.is_none() {
                let endpoint = &endpoints[xfers[k].target];
                job.fail(errors::engine(&format!("writing {:?} to {endpoint} failed", job.key), &e));
            }
            if e.is_peer_unreachable() {
                self.report_unreachable(&endpoints[xfers[k].target]);
            }
        }
        drop(scratch);

        // Complete what was written, give back what was not.
        let (ok, bad): (Vec<usize>, Vec<usize>) = written.iter().partition(|&&i| jobs[i].failure.is_none());
        if !ok.is_empty() {
            let keys = ok.iter().map(|&i| jobs[i].key.to_string()).collect();
            let request = Request::PutEnd { client: self.id, keys };
            let ended = match self.master.call(&request) {
                Ok(Response::PerKey(v)) => per_key(request.name(), ok.len(), v),
                Ok(other) => vec![Err(wrong_kind(request.name(), &other)); ok.len()],
                Err(e) => vec![Err(e); ok.len()],
            };
            for (&i, r) in ok.iter().zip(ended) {
                jobs[i].result = Some(r);
            }
        }
        if !bad.is_empty() {
            let keys = bad.iter().map(|&i| jobs[i].key.to_string()).collect();
            let request = Request::PutRevoke { client: self.id, keys };
            match self.master.call(&request) {
                Ok(Response::PerKey(v)) => {
                    for (&i, r) in bad.iter().zip(v) {
                        if let Err(e) = r {
                            tracing::warn!(key = jobs[i].key, error = %e, "put_revoke failed");
                        }
                    }
                }
                Ok(other) => {
                    wrong_kind(request.name(), &other);
                }
                Err(e) => tracing::warn!(error = %e, "put_revoke failed; the master reclaims the puts later"),
            }
            for &i in &bad {
                let e = jobs[i].failure.take().unwrap_or_else(|| ErrorCode::TransferFail.into());
                jobs[i].result = Some(Err(e));
            }
        }
        finish(jobs)
    }
}

/// Checks a job's key and source; computes its length and pins the caller's registrations.
fn validate(job: &mut Job<'_>, client: &Inner) -> Result<()> {
    if job.key.is_empty() {
        return Err(ErrorCode::InvalidKey.into());
    }
    let mut total: u64 = 0;
    match &job.source {
        Source::Bytes(parts) => {
            for part in parts {
                total = total.checked_add(part.len() as u64).ok_or(ErrorCode::InvalidParams)?;
            }
        }
        Source::Raw(parts) => {
            if parts.is_empty() {
                return Err(ErrorCode::InvalidParams.into());
            }
            for &(ptr, len) in parts {
                let guard = client.user_region(ptr, len)?;
                job.host &= guard.location.kind() == Some(MemoryKind::Host);
                job._guards.push(guard);
                total = total.checked_add(len).ok_or(ErrorCode::InvalidParams)?;
            }
        }
    }
    if total == 0 || total > isize::MAX as u64 {
        return Err(ErrorCode::InvalidParams.into());
    }
    job.len = total;
    Ok(())
}

fn finish(jobs: Vec<Job<'_>>) -> Vec<Result<()>> {
    jobs.into_iter().map(|j| j.result.unwrap_or(Err(ErrorCode::Internal.into()))).collect()
}
