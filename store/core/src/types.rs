//! Domain types shared by the master, the client and the wire protocol: error codes, replica descriptors,
//! segments, client ids, the per-put replication config and the master's config.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The master's answers that travel in protocol messages (tasks, key and segment views, ping outcomes), named here
/// so a client needs only `types`.
pub use crate::master::{
    KeyInfo, MasterStats, PingOutcome, SegmentInfo, TaskAssignment, TaskConfig, TaskId, TaskInfo, TaskKind, TaskStatus,
};

/// Result type of the store: every error is an [`ErrorCode`].
pub type Result<T> = std::result::Result<T, ErrorCode>;

/// A store error, with the upstream integer code of each variant (see [`ErrorCode::code`]).
///
/// Variants carry no data so that they round-trip through the integer code used by the Python and C APIs.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum ErrorCode {
    /// An invariant of the master broke; report a bug with the master's log.
    #[error("internal error in the store; check the master log and report a bug")]
    Internal,
    /// The caller's buffer is too small for the object; retry with a buffer of at least `get_size(key)` bytes.
    #[error("buffer too small for the object; allocate at least get_size(key) bytes")]
    BufferOverflow,
    /// No segment with that name (or endpoint) is mounted; mount it first or check the name.
    #[error("segment not found; mount it first or check the segment name")]
    SegmentNotFound,
    /// A segment with that name is already mounted by another client or with another layout.
    #[error("segment already mounted; use a unique segment name per buffer")]
    SegmentAlreadyExists,
    /// The master does not know this client; re-mount its segments.
    #[error("client not known to the master; re-mount its segments")]
    ClientNotFound,
    /// No healthy segment has room for the object, even after eviction; add memory or retry later.
    #[error("no segment has room for the object even after eviction; mount more memory or retry later")]
    NoAvailableHandle,
    /// The key is empty or otherwise unusable; use a non-empty key.
    #[error("invalid key; keys must be non-empty")]
    InvalidKey,
    /// An argument or config value is out of range; check the request.
    #[error("invalid parameters; check sizes, replica counts, ttls and patterns")]
    InvalidParams,
    /// The write cannot be applied in the object's current state (for example revoking a completed put).
    #[error("invalid write for the object's current state")]
    InvalidWrite,
    /// The read cannot be served as requested.
    #[error("invalid read")]
    InvalidRead,
    /// The object is still being written (put or upsert in progress); retry after put_end.
    #[error("object is still being written; retry after the writer calls put_end")]
    ReplicaNotReady,
    /// No object with that key; it was never put, was removed, or was evicted.
    #[error("object not found")]
    ObjectNotFound,
    /// An object with that key exists already; puts are put-if-absent, use upsert to replace it.
    #[error("object already exists; use upsert to replace it")]
    ObjectAlreadyExists,
    /// A reader holds a lease on the object; retry after the lease ends or remove with force.
    #[error("object is leased by a reader; retry later or remove with force")]
    ObjectHasLease,
    /// The lease ran out before the read finished; read again.
    #[error("lease expired before the transfer finished; read the object again")]
    LeaseExpired,
    /// Moving the bytes failed; retry, or report the peer as unreachable.
    #[error("data transfer failed; retry or report the peer as unreachable")]
    TransferFail,
    /// The RPC to the master failed; check that the master is running and reachable.
    #[error("RPC to the master failed; check that the master is reachable")]
    RpcFail,
    /// The RPC to the master timed out; retry, or check the master's load and network.
    #[error("RPC to the master timed out; retry or check the master")]
    RpcTimeout,
    /// The object or service cannot do this right now (for example every replica sits on an unreachable
    /// segment); retry later.
    #[error("unavailable in the current state (e.g. every replica is on an unreachable segment); retry later")]
    UnavailableInCurrentStatus,
    /// The operation is not supported by this master or client.
    #[error("operation not supported")]
    NotSupported,
    /// No task with that id (never created, or finished long enough ago to be forgotten).
    #[error("task not found")]
    TaskNotFound,
    /// The master's queue of pending tasks is full; retry later.
    #[error("too many pending tasks; retry later")]
    TaskPendingLimitExceeded,
}

impl ErrorCode {
    /// Every variant, for iteration in tests and tables.
    pub const ALL: [ErrorCode; 22] = [
        ErrorCode::Internal,
        ErrorCode::BufferOverflow,
        ErrorCode::SegmentNotFound,
        ErrorCode::SegmentAlreadyExists,
        ErrorCode::ClientNotFound,
        ErrorCode::NoAvailableHandle,
        ErrorCode::InvalidKey,
        ErrorCode::InvalidParams,
        ErrorCode::InvalidWrite,
        ErrorCode::InvalidRead,
        ErrorCode::ReplicaNotReady,
        ErrorCode::ObjectNotFound,
        ErrorCode::ObjectAlreadyExists,
        ErrorCode::ObjectHasLease,
        ErrorCode::LeaseExpired,
        ErrorCode::TransferFail,
        ErrorCode::RpcFail,
        ErrorCode::RpcTimeout,
        ErrorCode::UnavailableInCurrentStatus,
        ErrorCode::NotSupported,
        ErrorCode::TaskNotFound,
        ErrorCode::TaskPendingLimitExceeded,
    ];

    /// The upstream integer code (negative; 0 means success and has no variant).
    pub fn code(self) -> i32 {
        match self {
            ErrorCode::Internal => -1,
            ErrorCode::BufferOverflow => -10,
            ErrorCode::SegmentNotFound => -101,
            ErrorCode::SegmentAlreadyExists => -102,
            ErrorCode::ClientNotFound => -103,
            ErrorCode::NoAvailableHandle => -200,
            ErrorCode::InvalidKey => -400,
            ErrorCode::InvalidParams => -600,
            ErrorCode::InvalidWrite => -700,
            ErrorCode::InvalidRead => -701,
            ErrorCode::ReplicaNotReady => -703,
            ErrorCode::ObjectNotFound => -704,
            ErrorCode::ObjectAlreadyExists => -705,
            ErrorCode::ObjectHasLease => -706,
            ErrorCode::LeaseExpired => -707,
            ErrorCode::TransferFail => -800,
            ErrorCode::RpcFail => -900,
            ErrorCode::RpcTimeout => -901,
            ErrorCode::UnavailableInCurrentStatus => -1010,
            ErrorCode::NotSupported => -1012,
            ErrorCode::TaskNotFound => -1400,
            ErrorCode::TaskPendingLimitExceeded => -1401,
        }
    }

    /// The variant for an upstream integer code, or `None` for 0 and unknown codes.
    pub fn from_code(code: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.code() == code)
    }
}

/// Lifecycle of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReplicaStatus {
    /// Not set.
    Undefined,
    /// Created, no space assigned yet.
    Initialized,
    /// Space assigned; the writer is moving bytes in.
    Processing,
    /// Written and readable.
    Complete,
    /// Removed from the object.
    Removed,
    /// The write failed.
    Failed,
}

/// How one put should be replicated and protected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReplicateConfig {
    /// Number of replicas, each on a distinct segment (default 1).
    pub replica_num: usize,
    /// Keep the object until every unpinned object is evicted, for the soft pin ttl.
    pub with_soft_pin: bool,
    /// Soft pin ttl; `None` uses the master's default, and it is capped by the master's maximum.
    pub soft_pin_ttl_ms: Option<u64>,
    /// Never evict the object (it can still be removed).
    pub with_hard_pin: bool,
    /// Segment names to place replicas on first, in order.
    pub preferred_segments: Vec<String>,
    /// Prefer segments on the caller's host.
    pub prefer_alloc_in_same_node: bool,
    /// Objects sharing a group id are evicted together.
    pub group_ids: Vec<String>,
}

impl Default for ReplicateConfig {
    fn default() -> Self {
        ReplicateConfig {
            replica_num: 1,
            with_soft_pin: false,
            soft_pin_ttl_ms: None,
            with_hard_pin: false,
            preferred_segments: Vec::new(),
            prefer_alloc_in_same_node: false,
            group_ids: Vec::new(),
        }
    }
}

/// A client's identity: 128 random bits, printed as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClientId(pub u128);

impl ClientId {
    /// A fresh id from the process's random hasher keys (seeded by the OS), the time and a counter.
    pub fn random() -> Self {
        use std::collections::hash_map::RandomState;
        use std::hash::{BuildHasher, Hasher};
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let word = |salt: u64| {
            let mut h = RandomState::new().build_hasher();
            h.write_u128(nanos);
            h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
            h.write_u64(salt);
            h.finish()
        };
        ClientId((u128::from(word(1)) << 64) | u128::from(word(2)))
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl FromStr for ClientId {
    type Err = ErrorCode;

    fn from_str(s: &str) -> Result<Self> {
        if s.is_empty() || s.len() > 32 {
            return Err(ErrorCode::InvalidParams);
        }
        u128::from_str_radix(s, 16).map(ClientId).map_err(|_| ErrorCode::InvalidParams)
    }
}

/// A segment name (unique across the cluster).
pub type SegmentName = String;

/// A buffer a client contributes to the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Unique segment name.
    pub name: SegmentName,
    /// The transfer-engine segment where this memory is registered (whom readers and writers talk to).
    pub transport_endpoint: String,
    /// Address of the buffer in the owner's process.
    pub base: u64,
    /// Length of the buffer in bytes.
    pub size: u64,
    /// Hostname of the owner (for local-first placement).
    pub host: String,
    /// The owner's transport for this memory (`tcp`, `rdma`, ...; empty: unspecified). `cxl` marks a client's
    /// view of the master's shared CXL pool: `base` is then the pool's offset in the CXL region, and the master
    /// places objects in the pool instead of giving the segment an allocator of its own (docs/cxl.md).
    pub protocol: String,
}

/// Name of the segment standing for the shared CXL pool of a master started with `--enable_cxl`; replicas in
/// the pool carry it as their segment name, and their address is an offset in the CXL region.
pub const CXL_POOL_SEGMENT: &str = "cxl-pool";

/// Where one replica's bytes live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaDescriptor {
    /// The transfer-engine segment to read from or write to.
    pub transport_endpoint: String,
    /// Absolute address in the owner's process (segment base + offset).
    pub addr: u64,
    /// Length of the object in bytes.
    pub len: u64,
    /// Name of the store segment holding the replica.
    pub segment: SegmentName,
    /// Replica state.
    pub status: ReplicaStatus,
}

/// How the master picks segments for replicas after preferred and same-host segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AllocationStrategy {
    /// Uniformly random among segments with a fitting free block (upstream `random`).
    #[default]
    Random,
    /// Highest free ratio first (upstream `free_ratio_first`).
    FreeRatioFirst,
    /// Segments on the caller's host first, then random (upstream `local_first`).
    LocalFirst,
    /// One replica in the shared CXL pool (upstream `cxl`; needs [`MasterConfig::cxl`], which implies it).
    Cxl,
}

impl AllocationStrategy {
    /// Upstream's name for the strategy.
    pub fn as_str(self) -> &'static str {
        match self {
            AllocationStrategy::Random => "random",
            AllocationStrategy::FreeRatioFirst => "free_ratio_first",
            AllocationStrategy::LocalFirst => "local_first",
            AllocationStrategy::Cxl => "cxl",
        }
    }
}

impl fmt::Display for AllocationStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AllocationStrategy {
    type Err = ErrorCode;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "random" => Ok(AllocationStrategy::Random),
            "free_ratio_first" => Ok(AllocationStrategy::FreeRatioFirst),
            "local_first" => Ok(AllocationStrategy::LocalFirst),
            "cxl" => Ok(AllocationStrategy::Cxl),
            _ => Err(ErrorCode::InvalidParams),
        }
    }
}

/// Master settings, with upstream's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MasterConfig {
    /// Lease granted by exist/get; a leased object is neither evicted nor removed without force (10 s).
    pub default_kv_lease_ttl_ms: u64,
    /// Soft pin ttl when a put asks for a soft pin without a ttl (30 min).
    pub default_kv_soft_pin_ttl_ms: u64,
    /// Cap on any soft pin ttl (24 h).
    pub max_kv_soft_pin_ttl_ms: u64,
    /// Whether soft-pinned objects may be evicted once nothing else can be (true).
    pub allow_evict_soft_pinned_objects: bool,
    /// Fraction of objects one eviction pass removes (0.05).
    pub eviction_ratio: f64,
    /// Usage ratio at which `tick` starts an eviction pass (0.90).
    pub eviction_high_watermark_ratio: f64,
    /// A client silent for this long is dropped with its segments and replicas (10 s).
    pub client_ttl_ms: u64,
    /// A client silent for this long is suspect: no new placements, its replicas are not served (3 s).
    pub client_suspect_after_ms: u64,
    /// A put still unfinished after this long is reclaimed (30 s).
    pub put_start_discard_timeout_ms: u64,
    /// How replicas are placed after preferred and same-host segments.
    pub allocation_strategy: AllocationStrategy,
    /// Name of the cluster (used by the service for metadata prefixes).
    pub cluster_id: String,
    /// Limits and timeouts of copy and move tasks.
    pub tasks: crate::master::TaskConfig,
    /// The shared CXL pool (`--enable_cxl`): objects go there, one replica each, whatever the strategy says.
    pub cxl: Option<CxlPoolConfig>,
}

/// The shared CXL pool of a master (`--enable_cxl=true --cxl_path=... --cxl_size=...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CxlPoolConfig {
    /// The device every client maps (informational: clients find it through `MC_CXL_DEV_PATH`).
    pub path: String,
    /// Most bytes of the pool; clients' views of a smaller shared area shrink it to their size.
    pub size: u64,
}

impl Default for CxlPoolConfig {
    /// Upstream's defaults: `/dev/dax0.0`, 8 GiB.
    fn default() -> Self {
        CxlPoolConfig { path: "/dev/dax0.0".into(), size: 8 << 30 }
    }
}

impl Default for MasterConfig {
    fn default() -> Self {
        MasterConfig {
            default_kv_lease_ttl_ms: 10_000,
            default_kv_soft_pin_ttl_ms: 30 * 60 * 1000,
            max_kv_soft_pin_ttl_ms: 24 * 60 * 60 * 1000,
            allow_evict_soft_pinned_objects: true,
            eviction_ratio: 0.05,
            eviction_high_watermark_ratio: 0.90,
            client_ttl_ms: 10_000,
            client_suspect_after_ms: 3_000,
            put_start_discard_timeout_ms: 30_000,
            allocation_strategy: AllocationStrategy::Random,
            cluster_id: "mooncake_cluster".to_string(),
            tasks: Default::default(),
            cxl: None,
        }
    }
}

impl MasterConfig {
    /// Checks that ratios lie in `0..=1` (eviction ratio above 0), ttls are non-zero, the soft pin default
    /// does not exceed the maximum and suspicion starts before the client ttl runs out.
    pub fn validate(&self) -> Result<()> {
        let ratio_ok = |r: f64| (0.0..=1.0).contains(&r);
        let ok = ratio_ok(self.eviction_ratio)
            && self.eviction_ratio > 0.0
            && ratio_ok(self.eviction_high_watermark_ratio)
            && self.default_kv_lease_ttl_ms > 0
            && self.default_kv_soft_pin_ttl_ms > 0
            && self.default_kv_soft_pin_ttl_ms <= self.max_kv_soft_pin_ttl_ms
            && self.client_ttl_ms > 0
            && self.client_suspect_after_ms > 0
            && self.client_suspect_after_ms <= self.client_ttl_ms
            && self.put_start_discard_timeout_ms > 0
            && self.cxl.as_ref().is_none_or(|c| c.size >= crate::allocator::ALIGNMENT)
            && (self.allocation_strategy != AllocationStrategy::Cxl || self.cxl.is_some());
        if ok { Ok(()) } else { Err(ErrorCode::InvalidParams) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_round_trip() {
        for e in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(e.code()), Some(e));
            assert!(e.code() < 0);
            assert!(!e.to_string().is_empty());
        }
        assert_eq!(ErrorCode::from_code(0), None);
        assert_eq!(ErrorCode::from_code(-2), None);
        assert_eq!(ErrorCode::ObjectNotFound.code(), -704);
        assert_eq!(ErrorCode::NotSupported.code(), -1012);
    }

    #[test]
    fn strategy_parses_upstream_names() {
        for s in [
            AllocationStrategy::Random,
            AllocationStrategy::FreeRatioFirst,
            AllocationStrategy::LocalFirst,
            AllocationStrategy::Cxl,
        ] {
            assert_eq!(s.as_str().parse::<AllocationStrategy>(), Ok(s));
        }
        assert_eq!("fastest".parse::<AllocationStrategy>(), Err(ErrorCode::InvalidParams));
        assert_eq!(AllocationStrategy::default(), AllocationStrategy::Random);
    }

    #[test]
    fn client_id_hex_round_trip_and_random() {
        let id = ClientId(0xabc);
        assert_eq!(id.to_string(), "00000000000000000000000000000abc");
        assert_eq!(id.to_string().parse::<ClientId>(), Ok(id));
        assert!("xyz".parse::<ClientId>().is_err());
        assert!("".parse::<ClientId>().is_err());
        assert_ne!(ClientId::random(), ClientId::random());
    }

    #[test]
    fn config_defaults_are_upstream_and_valid() {
        let c = MasterConfig::default();
        assert_eq!(c.default_kv_lease_ttl_ms, 10_000);
        assert_eq!(c.default_kv_soft_pin_ttl_ms, 1_800_000);
        assert_eq!(c.max_kv_soft_pin_ttl_ms, 86_400_000);
        assert_eq!(c.eviction_ratio, 0.05);
        assert_eq!(c.eviction_high_watermark_ratio, 0.90);
        assert!(c.validate().is_ok());
        assert_eq!(ReplicateConfig::default().replica_num, 1);
    }

    #[test]
    fn config_rejects_nonsense() {
        let bad = [
            MasterConfig { eviction_ratio: 1.5, ..Default::default() },
            MasterConfig { eviction_ratio: 0.0, ..Default::default() },
            MasterConfig { eviction_high_watermark_ratio: -0.1, ..Default::default() },
            MasterConfig { eviction_high_watermark_ratio: f64::NAN, ..Default::default() },
            MasterConfig { default_kv_lease_ttl_ms: 0, ..Default::default() },
            MasterConfig { client_ttl_ms: 0, ..Default::default() },
            MasterConfig { client_suspect_after_ms: 20_000, ..Default::default() },
            MasterConfig { put_start_discard_timeout_ms: 0, ..Default::default() },
            MasterConfig { default_kv_soft_pin_ttl_ms: 2, max_kv_soft_pin_ttl_ms: 1, ..Default::default() },
        ];
        for c in bad {
            assert_eq!(c.validate(), Err(ErrorCode::InvalidParams), "{c:?}");
        }
    }
}
