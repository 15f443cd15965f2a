//! The client's side of copy and move tasks: a thread that asks the master for this client's tasks (once per
//! ping interval) and runs them. A task copies the object from its replica on our segment into the new
//! replicas the master reserves (`CopyStart`), then makes them part of the object (`CopyEnd`), or gives them
//! back (`CopyRevoke`) when the copy fails, and reports the outcome (`CompleteTask`).

use std::sync::{Arc, Weak};
use std::time::Duration;

use mooncake_core::{Opcode, Transfer};

use super::errors;
use super::lifecycle::{Inner, PingControl};
use super::local_copy;
use super::master::wrong_kind;
use crate::error::{Error, Result};
use crate::protocol::{Request, Response};
use crate::types::{ErrorCode, ReplicaDescriptor};
use crate::types::{TaskAssignment, TaskId};

/// Most tasks taken per fetch.
const FETCH_MAX: u32 = 8;

/// What a successful task reports (upstream's wording).
const DONE: &str = "Task completed successfully";

/// Fetches and runs this client's tasks until `control` says stop.
pub(crate) fn task_loop(weak: Weak<Inner>, control: Arc<PingControl>, interval: Duration) {
    while control.sleep(interval) {
        let Some(inner) = weak.upgrade() else { return };
        if let Ok(_open) = inner.op() {
            for task in inner.fetch_tasks() {
                inner.run_task(&task);
            }
        }
    }
}

impl Inner {
    fn fetch_tasks(&self) -> Vec<TaskAssignment> {
        let request = Request::FetchTasks { client: self.id, max: FETCH_MAX };
        match self.master.call(&request) {
            Ok(Response::Tasks(tasks)) => tasks,
            Ok(other) => {
                wrong_kind(request.name(), &other);
                Vec::new()
            }
            Err(_) => Vec::new(),
        }
    }

    /// Runs one task and reports how it ended.
    fn run_task(&self, task: &TaskAssignment) {
        let (ok, message) = match self.copy_for_task(task.id) {
            Ok(()) => (true, DONE.to_string()),
            Err((e, why)) => {
                tracing::warn!(key = task.key, task = ?task.id, error = %e, why, "copy task failed");
                (false, format!("{why}: {e}"))
            }
        };
        let request = Request::CompleteTask { client: self.id, id: task.id, ok, message };
        match self.master.call(&request) {
            Ok(Response::Done(Ok(()))) => {}
            Ok(Response::Done(Err(e))) => {
                tracing::warn!(task = ?task.id, error = %e, "the master refused a task report")
            }
            Ok(other) => {
                wrong_kind(request.name(), &other);
            }
            Err(e) => tracing::warn!(task = ?task.id, error = %e, "cannot report a task; it times out on the master"),
        }
    }

    /// Reserves, writes and commits the task's new replicas. On failure, what went wrong and why.
    fn copy_for_task(&self, id: TaskId) -> std::result::Result<(), (Error, &'static str)> {
        let (source, fresh) = match self.master.call(&Request::CopyStart { client: self.id, id }) {
            Ok(Response::CopyPlan(Ok(plan))) => plan,
            Ok(Response::CopyPlan(Err(e))) => return Err((e.into(), "the master could not reserve the new replicas")),
            Ok(other) => return Err((wrong_kind("copy_start", &other), "unexpected answer")),
            Err(e) => return Err((e, "copy_start failed")),
        };
        let written = self.write_copies(&source, &fresh);
        let request = match written {
            Ok(()) => Request::CopyEnd { client: self.id, id },
            Err(_) => Request::CopyRevoke { client: self.id, id },
        };
        let answer = match self.master.call(&request) {
            Ok(Response::Done(r)) => r.map_err(Error::from),
            Ok(other) => Err(wrong_kind(request.name(), &other)),
            Err(e) => Err(e),
        };
        match (written, answer) {
            (Ok(()), Ok(())) => Ok(()),
            (Ok(()), Err(e)) => Err((e, "the object changed while it was copied")),
            (Err(e), _) => Err((e, "writing the new replicas failed")),
        }
    }

    /// Copies the bytes of `source` (a replica on our own segment) into each of `targets`.
    fn write_copies(&self, source: &ReplicaDescriptor, targets: &[ReplicaDescriptor]) -> Result<()> {
        let Some(source_addr) = self.own_addr(source) else {
            tracing::error!(?source, "a copy task's source replica is not on this client's segment");
            return Err(ErrorCode::Internal.into());
        };
        let mut endpoints: Vec<String> = Vec::new();
        let mut xfers = Vec::new();
        for t in targets {
            if let Some(target_addr) = self.own_addr(t) {
                local_copy::copy_registered(self.engine.regions(), source_addr, target_addr, source.len)?;
                continue;
            }
            let endpoint = match endpoints.iter().position(|e| *e == t.transport_endpoint) {
                Some(i) => i,
                None => {
                    endpoints.push(t.transport_endpoint.clone());
                    endpoints.len() - 1
                }
            };
            xfers.push(Transfer {
                target: endpoint,
                opcode: Opcode::Write,
                local_addr: source_addr,
                remote_addr: t.addr,
                length: source.len,
            });
        }
        let results = self.engine.run_transfers(&endpoints, &xfers);
        for (x, r) in xfers.iter().zip(results) {
            if let Err(e) = r {
                let endpoint = &endpoints[x.target];
                if e.is_peer_unreachable() {
                    self.report_unreachable(endpoint);
                }
                return Err(errors::engine(&format!("copying a replica to {endpoint}"), &e));
            }
        }
        Ok(())
    }

    /// Queues a copy of `key` to `targets`; the task's id.
    pub(crate) fn create_copy_task(&self, key: &str, targets: &[String]) -> Result<TaskId> {
        self.task_rpc(Request::CreateCopyTask { key: key.to_string(), targets: targets.to_vec() })
    }

    /// Queues a move of `key`'s replica on `source` to `target`; the task's id.
    pub(crate) fn create_move_task(&self, key: &str, source: &str, target: &str) -> Result<TaskId> {
        self.task_rpc(Request::CreateMoveTask { key: key.to_string(), source: source.into(), target: target.into() })
    }

    fn task_rpc(&self, request: Request) -> Result<TaskId> {
        match self.master.call(&request)? {
            Response::Task(r) => r.map_err(Error::from),
            other => Err(wrong_kind(request.name(), &other)),
        }
    }
}
