//! The master's RPC messages (carried by `mooncake-store-rpc`, which the service and the client name with
//! [`SERVICE_NAME`] and [`PROTOCOL_VERSION`]: length-delimited frames, postcard,
//! request ids multiplexed on one connection). Every key-level call is a batch with one result per
//! key; single-key calls are batches of one, so both take the same path and one round trip.

use serde::{Deserialize, Serialize};

use crate::master::{KeyInfo, MasterStats, PingOutcome, SegmentInfo, TaskAssignment, TaskId, TaskInfo};
use crate::types::{ClientId, ReplicaDescriptor, ReplicateConfig, Result, Segment};

/// Service name both sides check in the RPC hello.
pub const SERVICE_NAME: &str = "mooncake-store-master";

/// Version of these messages; bump on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// Replicas of one object and the lease granted on it (milliseconds).
pub type ReplicaList = (Vec<ReplicaDescriptor>, u64);

/// A request to the master.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Liveness; answered with [`Response::Ping`].
    Ping {
        /// The calling client.
        client: ClientId,
    },
    /// Contributes a segment.
    MountSegment {
        /// The owning client.
        client: ClientId,
        /// The memory.
        segment: Segment,
    },
    /// Withdraws a segment (its replicas are dropped).
    UnmountSegment {
        /// The owning client.
        client: ClientId,
        /// Segment name.
        name: String,
    },
    /// A transfer to this segment or transfer endpoint failed: stop placing on it and serving it.
    ReportUnreachable {
        /// Segment name or transfer endpoint.
        target: String,
    },
    /// Whether keys exist (grants leases).
    Exist {
        /// Keys.
        keys: Vec<String>,
    },
    /// Replicas of keys (grants leases).
    GetReplicaList {
        /// Keys.
        keys: Vec<String>,
    },
    /// Object sizes.
    GetSize {
        /// Keys.
        keys: Vec<String>,
    },
    /// Reserves replicas for new objects (`upsert` replaces existing ones instead of failing).
    PutStart {
        /// The writing client.
        client: ClientId,
        /// `(key, length)` pairs.
        items: Vec<(String, u64)>,
        /// Replication settings for all of them.
        config: ReplicateConfig,
        /// Upsert instead of put-if-absent.
        upsert: bool,
    },
    /// The bytes are written: make the objects readable.
    PutEnd {
        /// The writing client.
        client: ClientId,
        /// Keys.
        keys: Vec<String>,
    },
    /// The write failed: release what `PutStart` reserved.
    PutRevoke {
        /// The writing client.
        client: ClientId,
        /// Keys.
        keys: Vec<String>,
    },
    /// Removes keys.
    Remove {
        /// Keys.
        keys: Vec<String>,
        /// Also leased objects.
        force: bool,
    },
    /// Removes keys matching a regular expression; answered with a count.
    RemoveByRegex {
        /// Pattern (Rust `regex` syntax).
        pattern: String,
        /// Also leased objects.
        force: bool,
    },
    /// Removes every key; answered with a count.
    RemoveAll {
        /// Also leased objects.
        force: bool,
    },
    /// Mounted segments.
    GetAllSegments,
    /// What the master knows about one key (grants no lease).
    QueryKey {
        /// Key.
        key: String,
    },
    /// Totals.
    Stats,
    // Later additions go last, so the variant numbers of the earlier ones stay what older peers send.
    /// Clears replicas of keys whose lease has run out (on one segment, or whole objects when `segment` is
    /// empty); answered with the keys cleared.
    ReplicaClear {
        /// Keys.
        keys: Vec<String>,
        /// Segment name, or empty for every replica.
        segment: String,
    },
    /// Queues a copy of an object to more segments; answered with [`Response::Task`].
    CreateCopyTask {
        /// Key.
        key: String,
        /// Segment names.
        targets: Vec<String>,
    },
    /// Queues a move of an object's replica; answered with [`Response::Task`].
    CreateMoveTask {
        /// Key.
        key: String,
        /// Segment holding the replica to move.
        source: String,
        /// Segment to move it to.
        target: String,
    },
    /// A task's state; answered with [`Response::TaskInfo`] (times in epoch milliseconds).
    QueryTask {
        /// The task.
        id: TaskId,
    },
    /// Hands the calling client up to `max` of its pending tasks; answered with [`Response::Tasks`].
    FetchTasks {
        /// The calling client.
        client: ClientId,
        /// Most tasks wanted.
        max: u32,
    },
    /// How a fetched task ended; answered with `Done`.
    CompleteTask {
        /// The calling client.
        client: ClientId,
        /// The task.
        id: TaskId,
        /// Whether it succeeded.
        ok: bool,
        /// What happened.
        message: String,
    },
    /// Reserves a task's new replicas; answered with [`Response::CopyPlan`].
    CopyStart {
        /// The calling client.
        client: ClientId,
        /// The task.
        id: TaskId,
    },
    /// The task's bytes are copied: make the new replicas part of the object; answered with `Done`.
    CopyEnd {
        /// The calling client.
        client: ClientId,
        /// The task.
        id: TaskId,
    },
    /// The copy failed: free what `CopyStart` reserved; answered with `Done`.
    CopyRevoke {
        /// The calling client.
        client: ClientId,
        /// The task.
        id: TaskId,
    },
}

/// The master's answer; each request kind has one response kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// To `Ping`.
    Ping(PingOutcome),
    /// To `MountSegment`, `UnmountSegment`, `ReportUnreachable`.
    Done(Result<()>),
    /// To `Exist`.
    Exist(Vec<Result<bool>>),
    /// To `GetReplicaList`.
    Replicas(Vec<Result<ReplicaList>>),
    /// To `GetSize`.
    Sizes(Vec<Result<u64>>),
    /// To `PutStart`.
    Placed(Vec<Result<Vec<ReplicaDescriptor>>>),
    /// To `PutEnd`, `PutRevoke`, `Remove`.
    PerKey(Vec<Result<()>>),
    /// To `RemoveByRegex`, `RemoveAll`.
    Count(Result<u64>),
    /// To `GetAllSegments`.
    Segments(Vec<SegmentInfo>),
    /// To `QueryKey`.
    Key(Result<KeyInfo>),
    /// To `Stats`.
    Stats(MasterStats),
    // Later additions go last (see `Request`).
    /// To `ReplicaClear`.
    Keys(Vec<String>),
    /// To `CreateCopyTask`, `CreateMoveTask`.
    Task(Result<TaskId>),
    /// To `QueryTask`.
    TaskInfo(Result<TaskInfo>),
    /// To `FetchTasks`.
    Tasks(Vec<TaskAssignment>),
    /// To `CopyStart`: the replica to read and the new replicas to write.
    CopyPlan(Result<(ReplicaDescriptor, Vec<ReplicaDescriptor>)>),
}

impl Request {
    /// Short snake_case name, as in the `master_<name>_requests_total` metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Ping { .. } => "ping",
            Request::MountSegment { .. } => "mount_segment",
            Request::UnmountSegment { .. } => "unmount_segment",
            Request::ReportUnreachable { .. } => "report_unreachable",
            Request::Exist { keys } if keys.len() == 1 => "exist_key",
            Request::Exist { .. } => "batch_exist_key",
            Request::GetReplicaList { keys } if keys.len() == 1 => "get_replica_list",
            Request::GetReplicaList { .. } => "batch_get_replica_list",
            Request::GetSize { .. } => "get_size",
            Request::PutStart { items, .. } if items.len() == 1 => "put_start",
            Request::PutStart { .. } => "batch_put_start",
            Request::PutEnd { keys, .. } if keys.len() == 1 => "put_end",
            Request::PutEnd { .. } => "batch_put_end",
            Request::PutRevoke { keys, .. } if keys.len() == 1 => "put_revoke",
            Request::PutRevoke { .. } => "batch_put_revoke",
            Request::Remove { .. } => "remove",
            Request::RemoveByRegex { .. } => "remove_by_regex",
            Request::RemoveAll { .. } => "remove_all",
            Request::ReplicaClear { .. } => "batch_replica_clear",
            Request::CreateCopyTask { .. } => "create_copy_task",
            Request::CreateMoveTask { .. } => "create_move_task",
            Request::QueryTask { .. } => "query_task",
            Request::FetchTasks { .. } => "fetch_tasks",
            Request::CompleteTask { .. } => "complete_task",
            Request::CopyStart { .. } => "copy_start",
            Request::CopyEnd { .. } => "copy_end",
            Request::CopyRevoke { .. } => "copy_revoke",
            Request::GetAllSegments => "get_all_segments",
            Request::QueryKey { .. } => "query_key",
            Request::Stats => "stats",
        }
    }
}

impl Response {
    /// Whether the whole request failed (for `_failures_total`; per-key failures are not counted).
    pub fn failed(&self) -> bool {
        match self {
            Response::Done(r) => r.is_err(),
            Response::Count(r) => r.is_err(),
            Response::Key(r) => r.is_err(),
            Response::Task(r) => r.is_err(),
            Response::TaskInfo(r) => r.is_err(),
            Response::CopyPlan(r) => r.is_err(),
            Response::Exist(v) => !v.is_empty() && v.iter().all(|r| r.is_err()),
            Response::Replicas(v) => !v.is_empty() && v.iter().all(|r| r.is_err()),
            Response::Sizes(v) => !v.is_empty() && v.iter().all(|r| r.is_err()),
            Response::Placed(v) => !v.is_empty() && v.iter().all(|r| r.is_err()),
            Response::PerKey(v) => !v.is_empty() && v.iter().all(|r| r.is_err()),
            Response::Ping(_) | Response::Segments(_) | Response::Stats(_) | Response::Keys(_) | Response::Tasks(_) => {
                false
            }
        }
    }
}
