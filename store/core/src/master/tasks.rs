//! Replica copy and move tasks. A user asks the master to copy an object to more segments, or to move its
//! replica from one segment to another; the master queues a task for a client that holds a replica (the owner
//! of the segment the bytes come from) and answers with the task's id. That client fetches its tasks, copies
//! the bytes (`copy_start` reserves the new replicas, `copy_end` adds them to the object and, for a move, drops
//! the source replica; `copy_revoke` gives them back) and reports the outcome; anyone can query a task's state.
//!
//! - A task is `Pending` until its client fetches it, `Processing` until it reports, then `Success` or
//!   `Failed`. A failure is retried (back to `Pending`) until `max_retry_attempts` runs out.
//! - A task pending longer than `pending_task_timeout_ms`, or processing longer than
//!   `processing_task_timeout_ms` without a report, fails with a message saying so (`tick`). 0 disables either.
//! - At most `max_total_pending_tasks` wait (more is `TaskPendingLimitExceeded`), at most
//!   `max_total_processing_tasks` run at once (fetches hand out no more), and the last
//!   `max_total_finished_tasks` finished ones stay queryable.
//! - The copy's source replica gets a read lease when the copy starts, so its bytes stay in place while they are
//!   read. The new replicas are invisible to readers until `copy_end`, and `copy_end` fails (freeing them) if the
//!   object was replaced, removed or lost the source replica meanwhile.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::core::MasterCore;
use super::objects::{ObjectState, PendingCopy, Replicas};
use crate::types::{ClientId, ErrorCode, ReplicaDescriptor, ReplicaStatus, Result};

/// A task's id (upstream shows it as a pair of u64, like a UUID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TaskId(pub u64, pub u64);

/// What a task does (upstream's `TaskType` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskKind {
    /// Add replicas on target segments.
    ReplicaCopy,
    /// Move the replica on a source segment to a target segment.
    ReplicaMove,
}

/// Where a task stands (upstream's `TaskStatus` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskStatus {
    /// Queued for its client.
    Pending,
    /// Fetched by its client, not reported yet.
    Processing,
    /// Done.
    Success,
    /// Given up (the message says why).
    Failed,
}

/// What `query_task` reports. Times are milliseconds of the master's clock (the service turns them into epoch
/// milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// The task.
    pub id: TaskId,
    /// Copy or move.
    pub kind: TaskKind,
    /// Current state.
    pub status: TaskStatus,
    /// When it was created.
    pub created_at_ms: u64,
    /// When its state last changed.
    pub updated_at_ms: u64,
    /// Why it failed, or what it did.
    pub message: String,
    /// The client that runs it.
    pub assigned_client: ClientId,
}

/// A task as its client gets it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskAssignment {
    /// The task.
    pub id: TaskId,
    /// Copy or move.
    pub kind: TaskKind,
    /// The object.
    pub key: String,
    /// Segments to put the new replicas on.
    pub targets: Vec<String>,
    /// For a move, the segment whose replica goes once the copy is in.
    pub source: Option<String>,
}

/// Limits and timeouts of the task queue (upstream's flags and defaults).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TaskConfig {
    /// Most tasks waiting to be fetched (10000).
    pub max_total_pending_tasks: usize,
    /// Most tasks fetched and not reported (10000).
    pub max_total_processing_tasks: usize,
    /// Finished tasks kept for `query_task` (10000).
    pub max_total_finished_tasks: usize,
    /// A task still pending after this fails; 0 never (300 s).
    pub pending_task_timeout_ms: u64,
    /// A task processing this long without a report fails; 0 never (300 s).
    pub processing_task_timeout_ms: u64,
    /// Failed attempts before a task fails for good (10).
    pub max_retry_attempts: u32,
}

impl Default for TaskConfig {
    fn default() -> Self {
        TaskConfig {
            max_total_pending_tasks: 10_000,
            max_total_processing_tasks: 10_000,
            max_total_finished_tasks: 10_000,
            pending_task_timeout_ms: 300_000,
            processing_task_timeout_ms: 300_000,
            max_retry_attempts: 10,
        }
    }
}

/// One task and what its client needs.
#[derive(Debug)]
struct TaskRecord {
    info: TaskInfo,
    assignment: TaskAssignment,
    /// When it last became pending (the pending timeout counts from here).
    queued_at: u64,
    attempts: u32,
}

/// The queue: every task by id, pending ids per client in order, finished ids oldest first.
#[derive(Debug, Default)]
pub(crate) struct TaskQueue {
    tasks: HashMap<TaskId, TaskRecord>,
    pending: HashMap<ClientId, VecDeque<TaskId>>,
    finished: VecDeque<TaskId>,
    pending_count: usize,
    processing_count: usize,
}

impl MasterCore {
    /// Queues a copy of `key` to each of `targets` (segment names). `ObjectNotFound` for a missing key,
    /// `ReplicaNotReady` while its first write is in flight, `InvalidParams` for no targets or an unknown one,
    /// `TaskPendingLimitExceeded` when the queue is full.
    pub fn create_copy_task(&mut self, key: &str, targets: &[String]) -> Result<TaskId> {
        let (owner, _) = self.copy_source(key, None)?;
        if targets.is_empty() || targets.iter().any(|t| self.segments.find(t).is_none()) {
            return Err(ErrorCode::InvalidParams);
        }
        // Each target once, in the order given.
        let mut unique: Vec<String> = Vec::with_capacity(targets.len());
        for t in targets {
            if !unique.contains(t) {
                unique.push(t.clone());
            }
        }
        self.submit_task(owner, TaskKind::ReplicaCopy, key, unique, None)
    }

    /// Queues a move of `key`'s replica on `source` to `target`. As [`MasterCore::create_copy_task`], and
    /// `InvalidParams` when `source == target`, either is unknown, or the object has no replica on `source`.
    pub fn create_move_task(&mut self, key: &str, source: &str, target: &str) -> Result<TaskId> {
        if source == target || self.segments.find(target).is_none() {
            self.copy_source(key, None)?;
            return Err(ErrorCode::InvalidParams);
        }
        let (owner, _) = self.copy_source(key, Some(source))?;
        self.submit_task(owner, TaskKind::ReplicaMove, key, vec![target.to_string()], Some(source.to_string()))
    }

    /// What a task looks like now. `TaskNotFound` for an unknown (or long finished) id.
    pub fn query_task(&self, id: TaskId) -> Result<TaskInfo> {
        self.tasks.tasks.get(&id).map(|t| t.info.clone()).ok_or(ErrorCode::TaskNotFound)
    }

    /// Hands `client` up to `max` of its pending tasks (fewer when the processing limit is reached); they become
    /// `Processing`.
    pub fn fetch_tasks(&mut self, client: ClientId, max: usize) -> Vec<TaskAssignment> {
        let now = self.now();
        let limit = self.config.tasks.max_total_processing_tasks;
        let q = &mut self.tasks;
        let mut out = Vec::new();
        let Some(queue) = q.pending.get_mut(&client) else { return out };
        while out.len() < max && q.processing_count < limit {
            let Some(id) = queue.pop_front() else { break };
            q.pending_count = q.pending_count.saturating_sub(1);
            let Some(t) = q.tasks.get_mut(&id) else { continue };
            if t.info.status != TaskStatus::Pending {
                continue;
            }
            t.info.status = TaskStatus::Processing;
            t.info.updated_at_ms = now;
            q.processing_count += 1;
            out.push(t.assignment.clone());
        }
        if queue.is_empty() {
            q.pending.remove(&client);
        }
        out
    }

    /// `client` reports how its task ended. A failure goes back to the queue until the retries run out.
    /// `TaskNotFound` for an unknown id, `InvalidParams` when `client` does not run it; a report on a finished
    /// task is ignored.
    pub fn complete_task(&mut self, client: ClientId, id: TaskId, ok: bool, message: &str) -> Result<()> {
        let now = self.now();
        let max_attempts = self.config.tasks.max_retry_attempts;
        let q = &mut self.tasks;
        let t = q.tasks.get_mut(&id).ok_or(ErrorCode::TaskNotFound)?;
        if t.info.assigned_client != client {
            return Err(ErrorCode::InvalidParams);
        }
        if t.info.status != TaskStatus::Processing {
            return Ok(());
        }
        q.processing_count = q.processing_count.saturating_sub(1);
        t.info.updated_at_ms = now;
        t.info.message = message.to_string();
        t.attempts += 1;
        if ok {
            t.info.status = TaskStatus::Success;
        } else if t.attempts < max_attempts {
            t.info.status = TaskStatus::Pending;
            t.queued_at = now;
            q.pending.entry(client).or_default().push_back(id);
            q.pending_count += 1;
            return Ok(());
        } else {
            t.info.status = TaskStatus::Failed;
        }
        q.finished.push_back(id);
        self.prune_finished_tasks();
        Ok(())
    }

    /// Reserves the new replicas of a copy or move task of `client`'s: on every target that has no replica of
    /// the object yet. Returns the source replica to read and the new replicas to write (possibly none). The
    /// source gets a read lease. `ReplicaNotReady` while another write or copy is in flight on the object.
    pub fn copy_start(&mut self, client: ClientId, id: TaskId) -> Result<(ReplicaDescriptor, Vec<ReplicaDescriptor>)> {
        let assignment = self.running_task(client, id)?;
        let (_, mut source_slot) = self.copy_source(&assignment.key, assignment.source.as_deref())?;
        if assignment.source.is_none() {
            // A copy reads from a replica of the client running it (it was picked as that replica's owner); the
            // first healthy replica may be another client's by now.
            let own = self.object(&assignment.key)?.replicas.iter().map(|r| r.segment).find(|&slot| {
                self.segments.get(slot).is_some_and(|s| s.owner == client) && self.segments.is_healthy(slot)
            });
            if let Some(slot) = own {
                source_slot = slot;
            }
        }
        let idx = self.find(&assignment.key)?;
        let now = self.now();
        let lease = self.config.default_kv_lease_ttl_ms;
        let (size, source, taken) = {
            let o = self.objects.get(idx).ok_or(ErrorCode::Internal)?;
            if o.is_writing() || self.copies.contains_key(&assignment.key) {
                return Err(ErrorCode::ReplicaNotReady);
            }
            let source = *o.replicas.iter().find(|r| r.segment == source_slot).ok_or(ErrorCode::Internal)?;
            let taken: Vec<u32> = o.replicas.iter().map(|r| r.segment).collect();
            (o.size, source, taken)
        };
        let mut fresh = Replicas::new();
        for target in &assignment.targets {
            let Some(slot) = self.segments.find(target) else {
                self.release_replicas(fresh, 0);
                return Err(ErrorCode::SegmentNotFound);
            };
            if taken.contains(&slot) || fresh.iter().any(|r| r.segment == slot) {
                continue;
            }
            let alloc = self.segments.get_mut(slot).and_then(|s| s.alloc.allocate(size));
            let Some(alloc) = alloc else {
                self.release_replicas(fresh, 0);
                return Err(ErrorCode::NoAvailableHandle);
            };
            fresh.push(super::objects::Replica { segment: slot, alloc });
        }
        let source_desc = self.descriptor(&source, ReplicaStatus::Complete).ok_or(ErrorCode::Internal)?;
        let new_descs: Vec<ReplicaDescriptor> =
            fresh.iter().filter_map(|r| self.descriptor(r, ReplicaStatus::Processing)).collect();
        let o = self.objects.get_mut(idx).ok_or(ErrorCode::Internal)?;
        o.grant_read_lease(now, lease);
        self.copies.insert(assignment.key, PendingCopy { task: id, replicas: fresh, source });
        Ok((source_desc, new_descs))
    }

    /// The bytes are copied: adds the new replicas to the object and, for a move, drops the source replica.
    /// `InvalidWrite` (the new replicas freed) when the object changed meanwhile.
    pub fn copy_end(&mut self, client: ClientId, id: TaskId) -> Result<()> {
        let assignment = self.running_task(client, id)?;
        let idx = self.find(&assignment.key)?;
        let copy = match self.copies.remove(&assignment.key) {
            Some(c) if c.task == id => c,
            other => {
                if let Some(c) = other {
                    self.copies.insert(assignment.key, c);
                }
                return Err(ErrorCode::InvalidWrite);
            }
        };
        let o = self.objects.get_mut(idx).ok_or(ErrorCode::Internal)?;
        if o.state != ObjectState::Complete || !o.replicas.contains(&copy.source) {
            self.release_replicas(copy.replicas, 0);
            return Err(ErrorCode::InvalidWrite);
        }
        o.replicas.extend(copy.replicas);
        if assignment.kind == TaskKind::ReplicaMove {
            if let Some(pos) = o.replicas.iter().position(|r| *r == copy.source) {
                let gone = o.replicas.remove(pos);
                let read_until = o.read_until;
                self.release_replicas([gone], read_until);
            }
        }
        Ok(())
    }

    /// The copy failed: frees the replicas `copy_start` reserved.
    pub fn copy_revoke(&mut self, client: ClientId, id: TaskId) -> Result<()> {
        let assignment = self.running_task(client, id)?;
        match self.copies.remove(&assignment.key) {
            Some(c) if c.task == id => {
                self.release_replicas(c.replicas, 0);
                Ok(())
            }
            other => {
                if let Some(c) = other {
                    self.copies.insert(assignment.key, c);
                }
                Err(ErrorCode::InvalidWrite)
            }
        }
    }

    /// Fails tasks past their timeouts and copies whose task is gone or ended (freeing their replicas); called
    /// by `tick`. Returns how many tasks failed.
    pub(crate) fn expire_tasks(&mut self, now: u64) -> u64 {
        let cfg = self.config.tasks.clone();
        let mut failed = Vec::new();
        for (id, t) in &self.tasks.tasks {
            let late = match t.info.status {
                TaskStatus::Pending => {
                    cfg.pending_task_timeout_ms > 0 && now.saturating_sub(t.queued_at) > cfg.pending_task_timeout_ms
                }
                TaskStatus::Processing => {
                    cfg.processing_task_timeout_ms > 0
                        && now.saturating_sub(t.info.updated_at_ms) > cfg.processing_task_timeout_ms
                }
                _ => false,
            };
            if late {
                failed.push(*id);
            }
        }
        for id in &failed {
            let q = &mut self.tasks;
            let Some(t) = q.tasks.get_mut(id) else { continue };
            match t.info.status {
                TaskStatus::Pending => {
                    q.pending_count = q.pending_count.saturating_sub(1);
                    if let Some(queue) = q.pending.get_mut(&t.info.assigned_client) {
                        queue.retain(|x| x != id);
                    }
                    t.info.message = "pending timeout".into();
                }
                _ => {
                    q.processing_count = q.processing_count.saturating_sub(1);
                    t.info.message = "processing timeout".into();
                }
            }
            t.info.status = TaskStatus::Failed;
            t.info.updated_at_ms = now;
            q.finished.push_back(*id);
        }
        self.tasks.pending.retain(|_, queue| !queue.is_empty());
        // Copies whose task no longer runs (timed out, or its client gave up without revoking).
        let stale: Vec<String> = self
            .copies
            .iter()
            .filter(|(_, c)| self.tasks.tasks.get(&c.task).is_none_or(|t| t.info.status != TaskStatus::Processing))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            if let Some(copy) = self.copies.remove(&key) {
                self.release_replicas(copy.replicas, 0);
            }
        }
        self.prune_finished_tasks();
        failed.len() as u64
    }

    /// The client to run a copy of `key` (the owner of the replica to read) and that replica's segment slot:
    /// the replica on `source` when given (`InvalidParams` if there is none), else the first on a healthy
    /// segment.
    fn copy_source(&self, key: &str, source: Option<&str>) -> Result<(ClientId, u32)> {
        let o = self.object(key)?;
        if o.state != ObjectState::Complete {
            return Err(ErrorCode::ReplicaNotReady);
        }
        let slot = match source {
            Some(name) => {
                let slot = self.segments.find(name).ok_or(ErrorCode::InvalidParams)?;
                o.replicas.iter().find(|r| r.segment == slot).map(|r| r.segment).ok_or(ErrorCode::InvalidParams)?
            }
            None => o
                .replicas
                .iter()
                .find(|r| self.segments.is_healthy(r.segment))
                .or(o.replicas.first())
                .map(|r| r.segment)
                .ok_or(ErrorCode::UnavailableInCurrentStatus)?,
        };
        let owner = self.segments.get(slot).map(|s| s.owner).ok_or(ErrorCode::Internal)?;
        Ok((owner, slot))
    }

    fn submit_task(
        &mut self,
        client: ClientId,
        kind: TaskKind,
        key: &str,
        targets: Vec<String>,
        source: Option<String>,
    ) -> Result<TaskId> {
        if self.tasks.pending_count >= self.config.tasks.max_total_pending_tasks {
            tracing::warn!(limit = self.config.tasks.max_total_pending_tasks, "task queue full");
            return Err(ErrorCode::TaskPendingLimitExceeded);
        }
        let mut id = TaskId(self.rng.next_u64(), self.rng.next_u64());
        while id == TaskId(0, 0) || self.tasks.tasks.contains_key(&id) {
            id = TaskId(self.rng.next_u64(), self.rng.next_u64());
        }
        let now = self.now();
        let info = TaskInfo {
            id,
            kind,
            status: TaskStatus::Pending,
            created_at_ms: now,
            updated_at_ms: now,
            message: String::new(),
            assigned_client: client,
        };
        let assignment = TaskAssignment { id, kind, key: key.to_string(), targets, source };
        self.tasks.tasks.insert(id, TaskRecord { info, assignment, queued_at: now, attempts: 0 });
        self.tasks.pending.entry(client).or_default().push_back(id);
        self.tasks.pending_count += 1;
        Ok(id)
    }

    /// The assignment of a task `client` is running (`TaskNotFound`, or `InvalidParams` when not its own or
    /// not processing).
    fn running_task(&self, client: ClientId, id: TaskId) -> Result<TaskAssignment> {
        let t = self.tasks.tasks.get(&id).ok_or(ErrorCode::TaskNotFound)?;
        if t.info.assigned_client != client || t.info.status != TaskStatus::Processing {
            return Err(ErrorCode::InvalidParams);
        }
        Ok(t.assignment.clone())
    }

    fn prune_finished_tasks(&mut self) {
        let q = &mut self.tasks;
        while q.finished.len() > self.config.tasks.max_total_finished_tasks {
            if let Some(id) = q.finished.pop_front() {
                q.tasks.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::master::TaskStatus;
    use crate::master::testing::{cfg, harness, quiet};
    use crate::types::{ClientId, ErrorCode, MasterConfig};

    #[test]
    fn copy_task_runs_on_the_source_owner_and_adds_a_replica() {
        let mut h = harness(quiet());
        h.mount(1, "a", "h1", 1 << 20);
        h.mount(2, "b", "h2", 1 << 20);
        h.core
            .put_start(
                ClientId(1),
                "k",
                100,
                &crate::types::ReplicateConfig { preferred_segments: vec!["a".into()], ..cfg(1) },
            )
            .unwrap();
        h.core.put_end(ClientId(1), "k").unwrap();
        assert_eq!(h.core.create_copy_task("missing", &["b".into()]), Err(ErrorCode::ObjectNotFound));
        assert_eq!(h.core.create_copy_task("k", &["nosuch".into()]), Err(ErrorCode::InvalidParams));
        assert_eq!(h.core.create_copy_task("k", &[]), Err(ErrorCode::InvalidParams));
        let id = h.core.create_copy_task("k", &["b".into()]).unwrap();
        let info = h.core.query_task(id).unwrap();
        assert_eq!((info.status, info.assigned_client), (TaskStatus::Pending, ClientId(1)));
        assert!(h.core.fetch_tasks(ClientId(2), 8).is_empty());
        let got = h.core.fetch_tasks(ClientId(1), 8);
        assert_eq!(got.len(), 1);
        assert_eq!(h.core.query_task(id).unwrap().status, TaskStatus::Processing);
        // Someone else cannot drive it.
        assert_eq!(h.core.copy_start(ClientId(2), id).unwrap_err(), ErrorCode::InvalidParams);
        let (source, fresh) = h.core.copy_start(ClientId(1), id).unwrap();
        assert_eq!((source.segment.as_str(), fresh.len(), fresh[0].segment.as_str()), ("a", 1, "b"));
        // Invisible until copy_end.
        assert_eq!(h.core.get_replica_list("k").unwrap().0.len(), 1);
        h.core.copy_end(ClientId(1), id).unwrap();
        h.core.complete_task(ClientId(1), id, true, "done").unwrap();
        assert_eq!(h.core.get_replica_list("k").unwrap().0.len(), 2);
        assert_eq!(h.core.query_task(id).unwrap().status, TaskStatus::Success);
        h.check();
    }

    #[test]
    fn move_task_drops_the_source_and_failures_retry_then_fail() {
        let mut h = harness(MasterConfig {
            tasks: super::TaskConfig { max_retry_attempts: 2, ..Default::default() },
            ..quiet()
        });
        h.mount(1, "a", "h1", 1 << 20);
        h.mount(2, "b", "h2", 1 << 20);
        let pref = crate::types::ReplicateConfig { preferred_segments: vec!["a".into()], ..cfg(1) };
        h.core.put_start(ClientId(1), "k", 100, &pref).unwrap();
        h.core.put_end(ClientId(1), "k").unwrap();
        assert_eq!(h.core.create_move_task("k", "a", "a"), Err(ErrorCode::InvalidParams));
        assert_eq!(h.core.create_move_task("k", "b", "a"), Err(ErrorCode::InvalidParams));
        let id = h.core.create_move_task("k", "a", "b").unwrap();
        // Two failed attempts: pending again after the first, failed for good after the second.
        for round in 0..2 {
            assert_eq!(h.core.fetch_tasks(ClientId(1), 8).len(), 1);
            h.core.copy_start(ClientId(1), id).unwrap();
            h.core.copy_revoke(ClientId(1), id).unwrap();
            h.core.complete_task(ClientId(1), id, false, "boom").unwrap();
            let want = if round == 0 { TaskStatus::Pending } else { TaskStatus::Failed };
            assert_eq!(h.core.query_task(id).unwrap().status, want);
        }
        assert_eq!(h.core.stats().allocated_bytes, 104);
        let id = h.core.create_move_task("k", "a", "b").unwrap();
        h.core.fetch_tasks(ClientId(1), 8);
        h.core.copy_start(ClientId(1), id).unwrap();
        h.core.copy_end(ClientId(1), id).unwrap();
        h.core.complete_task(ClientId(1), id, true, "").unwrap();
        let replicas = h.core.get_replica_list("k").unwrap().0;
        assert_eq!(replicas.iter().map(|r| r.segment.as_str()).collect::<Vec<_>>(), vec!["b"]);
        // The source's bytes stay reserved until the read lease runs out.
        h.advance(60_000);
        h.core.tick();
        assert_eq!(h.core.stats().allocated_bytes, 104);
        h.check();
    }

    #[test]
    fn a_copy_reads_from_the_running_clients_replica() {
        let mut h = harness(quiet());
        h.mount(1, "a", "h1", 1 << 20);
        h.mount(2, "b", "h2", 1 << 20);
        h.mount(3, "c", "h3", 1 << 20);
        let both = crate::types::ReplicateConfig { preferred_segments: vec!["a".into(), "b".into()], ..cfg(2) };
        h.core.put_start(ClientId(1), "k", 100, &both).unwrap();
        h.core.put_end(ClientId(1), "k").unwrap();
        // While "a" is suspect the task goes to "b"'s owner; "a" is healthy again when the copy starts, and the
        // copy must still read "b", the running client's own replica.
        h.core.report_unreachable("a@ep").unwrap();
        let id = h.core.create_copy_task("k", &["c".into()]).unwrap();
        assert_eq!(h.core.query_task(id).unwrap().assigned_client, ClientId(2));
        h.core.ping(ClientId(1));
        h.core.fetch_tasks(ClientId(2), 8);
        let (source, fresh) = h.core.copy_start(ClientId(2), id).unwrap();
        assert_eq!((source.segment.as_str(), fresh[0].segment.as_str()), ("b", "c"));
        h.check();
    }

    #[test]
    fn copy_fails_when_the_object_changes_and_tasks_time_out() {
        let mut h = harness(MasterConfig {
            tasks: super::TaskConfig {
                max_retry_attempts: 1,
                pending_task_timeout_ms: 1000,
                processing_task_timeout_ms: 1000,
                max_total_pending_tasks: 1,
                ..Default::default()
            },
            ..quiet()
        });
        h.mount(1, "a", "h1", 1 << 20);
        h.mount(2, "b", "h2", 1 << 20);
        let pref = crate::types::ReplicateConfig { preferred_segments: vec!["a".into()], ..cfg(1) };
        h.core.put_start(ClientId(1), "k", 100, &pref).unwrap();
        h.core.put_end(ClientId(1), "k").unwrap();
        let id = h.core.create_copy_task("k", &["b".into()]).unwrap();
        assert_eq!(h.core.create_copy_task("k", &["b".into()]), Err(ErrorCode::TaskPendingLimitExceeded));
        h.core.fetch_tasks(ClientId(1), 8);
        h.core.copy_start(ClientId(1), id).unwrap();
        h.core.remove("k", true).unwrap();
        assert_eq!(h.core.copy_end(ClientId(1), id), Err(ErrorCode::ObjectNotFound));
        h.core.complete_task(ClientId(1), id, false, "object gone").unwrap();
        // Timeouts: one pending, one processing.
        h.put("k2", 100).unwrap();
        let pending = h.core.create_copy_task("k2", &["b".into()]).unwrap();
        h.advance(2000);
        h.core.tick();
        let info = h.core.query_task(pending).unwrap();
        assert_eq!((info.status, info.message.as_str()), (TaskStatus::Failed, "pending timeout"));
        let owner = info.assigned_client;
        let running = h.core.create_copy_task("k2", &["a".into(), "b".into()]).unwrap();
        h.core.fetch_tasks(owner, 8);
        h.core.copy_start(owner, running).unwrap();
        h.advance(2000);
        h.core.tick();
        let info = h.core.query_task(running).unwrap();
        assert_eq!((info.status, info.message.as_str()), (TaskStatus::Failed, "processing timeout"));
        // The reserved replica went back with it.
        assert_eq!(h.core.get_replica_list("k2").unwrap().0.len(), 1);
        assert_eq!(h.core.query_task(super::TaskId(1, 2)), Err(ErrorCode::TaskNotFound));
        h.check();
    }
}
