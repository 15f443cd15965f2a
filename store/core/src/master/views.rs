//! What the core hands back to the service: ping outcomes, statistics, segment and key views, tick reports.

use serde::{Deserialize, Serialize};

use crate::types::{ClientId, ReplicaDescriptor};

/// Answer to a client's ping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PingOutcome {
    /// The client is known and alive.
    Ok,
    /// The master does not know the client (it restarted, or dropped the client): mount the segments again.
    NeedRemount,
}

/// Totals for metrics (`master_key_count`, `master_allocated_bytes`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterStats {
    /// Objects, including puts in flight.
    pub key_count: u64,
    /// Bytes reserved in all segments (object lengths rounded up to 8 bytes).
    pub allocated_bytes: u64,
    /// Sum of the sizes of all mounted segments.
    pub total_capacity_bytes: u64,
    /// Clients that mounted memory and have not expired.
    pub active_clients: u64,
    /// Objects evicted since start.
    pub evicted_key_count: u64,
    /// Mounted segments.
    pub mounted_segments: u64,
    /// Mounted segments whose owner is suspect.
    pub suspect_segments: u64,
}

/// One mounted segment, for `/get_all_segments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentInfo {
    /// Unique segment name.
    pub name: String,
    /// Transfer-engine segment holding the memory.
    pub transport_endpoint: String,
    /// Owner's host.
    pub host: String,
    /// Owning client.
    pub owner: ClientId,
    /// Size in bytes.
    pub size: u64,
    /// Reserved bytes.
    pub used: u64,
    /// False while the owner is suspect (missed pings or reported unreachable).
    pub healthy: bool,
}

/// Everything known about one key, for `/query_key` (reading it grants no lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    /// Object length in bytes.
    pub size: u64,
    /// Current replicas (status `Complete`, or `Processing` before `put_end`), then those of an upsert in flight
    /// (status `Processing`).
    pub replicas: Vec<ReplicaDescriptor>,
    /// Milliseconds left on the readers' lease (0 when none).
    pub lease_remaining_ms: u64,
    /// Milliseconds left on the soft pin (0 when none).
    pub soft_pin_remaining_ms: u64,
    /// Never evicted.
    pub hard_pinned: bool,
    /// Group ids (objects sharing one are evicted together).
    pub group_ids: Vec<String>,
    /// An upsert is writing new replicas.
    pub upsert_pending: bool,
}

/// What one `tick` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TickReport {
    /// Clients dropped for missing pings for `client_ttl_ms` (their segments and replicas are gone).
    pub dropped_clients: Vec<ClientId>,
    /// Allocations freed because the lease that kept them ran out.
    pub released_allocations: u64,
    /// Unfinished puts and upserts reclaimed after `put_start_discard_timeout_ms`.
    pub reclaimed_writes: u64,
    /// Objects evicted by the watermark pass.
    pub evicted_objects: u64,
    /// Copy and move tasks failed for their pending or processing timeout.
    pub failed_tasks: u64,
}
