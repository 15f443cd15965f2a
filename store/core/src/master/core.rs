//! The `MasterCore` state machine: its state, constructor, shared helpers, `tick` and introspection. The
//! operations live in sibling modules (`membership`, `writes`, `reads`, `removal`, `placement`, `eviction`).

use std::collections::HashMap;

use super::clock::Clock;
use super::groups::GroupInterner;
use super::objects::{Object, ObjectTable, Replica};
use super::segments::{ClientState, SegmentTable};
use super::views::{KeyInfo, MasterStats, SegmentInfo, TickReport};
use crate::allocator::Allocation;
use crate::rng::Rng;
use crate::types::{ClientId, ErrorCode, MasterConfig, ReplicaDescriptor, ReplicaStatus, Result};

/// An allocation kept until readers' leases run out.
#[derive(Debug)]
pub(crate) struct DeferredFree {
    pub(crate) release_at: u64,
    pub(crate) segment: u32,
    pub(crate) alloc: Allocation,
}

/// The store master's logic as a pure state machine: no sockets, threads or clock reads of its own.
///
/// The service owns it behind a mutex, calls one method per request, and calls [`MasterCore::tick`] every
/// ~100 ms to expire clients, release lease-protected allocations, reclaim abandoned puts and evict at the high
/// watermark. Time comes from the injected [`Clock`], choices from a seeded generator, so runs are reproducible.
pub struct MasterCore {
    pub(crate) config: MasterConfig,
    pub(crate) clock: Box<dyn Clock>,
    pub(crate) rng: Rng,
    pub(crate) objects: ObjectTable,
    pub(crate) segments: SegmentTable,
    pub(crate) clients: HashMap<ClientId, ClientState>,
    pub(crate) groups: GroupInterner,
    pub(crate) deferred: Vec<DeferredFree>,
    /// Bumped at the start of every eviction pass.
    pub(crate) eviction_epoch: u32,
    pub(crate) evicted_total: u64,
    /// Earliest time an unfinished write can become a zombie (`u64::MAX`: none in flight).
    pub(crate) next_zombie_check: u64,
    /// Copy and move tasks.
    pub(crate) tasks: super::tasks::TaskQueue,
    /// Replicas being written by copy and move tasks, by object key (kept out of `Object` to keep it small).
    pub(crate) copies: HashMap<String, super::objects::PendingCopy>,
    /// The shared CXL pool, when the config has one.
    pub(crate) cxl: Option<super::cxl::CxlPool>,
}

impl std::fmt::Debug for MasterCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterCore").field("config", &self.config).field("stats", &self.stats()).finish()
    }
}

impl MasterCore {
    /// A core with no clients or objects. `seed` fixes every random choice (placement); the config is validated.
    pub fn new(config: MasterConfig, clock: Box<dyn Clock>, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut segments = SegmentTable::default();
        let cxl = config.cxl.as_ref().map(|c| super::cxl::CxlPool {
            config: c.clone(),
            slot: segments.insert(super::cxl::pool_segment(c)),
            views: Vec::new(),
        });
        Ok(MasterCore {
            config,
            clock,
            rng: Rng::new(seed),
            objects: ObjectTable::default(),
            segments,
            clients: HashMap::new(),
            groups: GroupInterner::default(),
            deferred: Vec::new(),
            eviction_epoch: 0,
            evicted_total: 0,
            next_zombie_check: u64::MAX,
            tasks: Default::default(),
            copies: HashMap::new(),
            cxl,
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &MasterConfig {
        &self.config
    }

    /// The core's clock, in milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.now()
    }

    pub(crate) fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Periodic work: drops clients silent for `client_ttl_ms` and marks those silent for
    /// `client_suspect_after_ms` suspect, frees allocations whose protecting lease ran out, reclaims puts and
    /// upserts unfinished after `put_start_discard_timeout_ms`, and runs an eviction pass when usage is at or
    /// above the high watermark.
    pub fn tick(&mut self) -> TickReport {
        let now = self.now();
        let dropped_clients = self.expire_clients(now);
        let released_allocations = self.release_deferred(now);
        let reclaimed_writes = self.reclaim_zombies(now);
        let failed_tasks = self.expire_tasks(now);
        let (used, capacity) = self.usage();
        // Relative rounding of the u128 -> f64 conversions is 2^-53, far below any meaningful watermark step.
        let evicted_objects =
            if capacity > 0 && used as f64 >= self.config.eviction_high_watermark_ratio * capacity as f64 {
                self.evict(now, 0)
            } else {
                0
            };
        TickReport { dropped_clients, released_allocations, reclaimed_writes, evicted_objects, failed_tasks }
    }

    /// Totals for metrics. Byte totals above `u64::MAX` (several segments near the 2^64-byte limit) read as
    /// `u64::MAX`.
    pub fn stats(&self) -> MasterStats {
        let (used, capacity) = self.usage();
        let saturate = |bytes: u128| u64::try_from(bytes).unwrap_or(u64::MAX);
        MasterStats {
            key_count: self.objects.len() as u64,
            allocated_bytes: saturate(used),
            total_capacity_bytes: saturate(capacity),
            active_clients: self.clients.len() as u64,
            evicted_key_count: self.evicted_total,
            mounted_segments: self.segments.len() as u64,
            suspect_segments: self.segments.iter().filter(|(_, s)| s.suspect).count() as u64,
        }
    }

    /// Every mounted segment.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.segments
            .iter()
            .map(|(_, s)| SegmentInfo {
                name: s.info.name.clone(),
                transport_endpoint: s.info.transport_endpoint.clone(),
                host: s.info.host.clone(),
                owner: s.owner,
                size: s.info.size,
                used: s.alloc.used_bytes(),
                healthy: !s.suspect,
            })
            .collect()
    }

    /// Everything known about `key`, without granting a lease.
    pub fn query_key(&self, key: &str) -> Result<KeyInfo> {
        let now = self.now();
        let o = self.object(key)?;
        let mut replicas: Vec<ReplicaDescriptor> =
            o.replicas.iter().filter_map(|r| self.descriptor(r, o.state.replica_status())).collect();
        if let Some(up) = &o.upsert {
            replicas.extend(up.replicas.iter().filter_map(|r| self.descriptor(r, ReplicaStatus::Processing)));
        }
        Ok(KeyInfo {
            size: o.size,
            replicas,
            lease_remaining_ms: o.lease_until.saturating_sub(now),
            soft_pin_remaining_ms: o.soft_pin_until.saturating_sub(now),
            hard_pinned: o.hard_pin,
            group_ids: o.groups.iter().flatten().map(|&id| self.groups.name(id).to_string()).collect(),
            upsert_pending: o.upsert.is_some(),
        })
    }

    /// (reserved bytes, capacity bytes) over all segments. Summed in `u128`: each segment is below 2^64 bytes
    /// (`base + size` must fit in a `u64`), but segments of different clients live in different address spaces,
    /// so their total need not fit (a `u64` sum overflowed: a panic in debug builds, a wrapped capacity that
    /// skewed the watermark in release builds).
    pub(crate) fn usage(&self) -> (u128, u128) {
        self.segments
            .iter()
            .fold((0, 0), |(u, c), (_, s)| (u + u128::from(s.alloc.used_bytes()), c + u128::from(s.info.size)))
    }

    /// The object with `key`, or `InvalidKey` / `ObjectNotFound`.
    pub(crate) fn object(&self, key: &str) -> Result<&Object> {
        let idx = self.find(key)?;
        self.objects.get(idx).ok_or(ErrorCode::Internal)
    }

    /// Position of the object with `key`, or `InvalidKey` / `ObjectNotFound`.
    pub(crate) fn find(&self, key: &str) -> Result<usize> {
        if key.is_empty() {
            return Err(ErrorCode::InvalidKey);
        }
        self.objects.find(key).ok_or(ErrorCode::ObjectNotFound)
    }

    /// Where a replica lives, as the wire shows it (`None` if its segment is gone, which invariants forbid).
    pub(crate) fn descriptor(&self, replica: &Replica, status: ReplicaStatus) -> Option<ReplicaDescriptor> {
        let s = self.segments.get(replica.segment)?;
        Some(ReplicaDescriptor {
            transport_endpoint: s.info.transport_endpoint.clone(),
            addr: s.info.base + replica.alloc.offset(),
            len: replica.alloc.len(),
            segment: s.info.name.clone(),
            status,
        })
    }

    /// Frees replicas now, or once `protected_until` has passed if readers may still be reading them.
    pub(crate) fn release_replicas(&mut self, replicas: impl IntoIterator<Item = Replica>, protected_until: u64) {
        let now = self.now();
        for r in replicas {
            if protected_until > now {
                self.deferred.push(DeferredFree { release_at: protected_until, segment: r.segment, alloc: r.alloc });
            } else {
                self.free_allocation(r.segment, r.alloc);
            }
        }
    }

    fn free_allocation(&mut self, segment: u32, alloc: Allocation) {
        let freed = self.segments.get_mut(segment).map(|s| s.alloc.free(alloc));
        if freed != Some(Ok(())) {
            tracing::error!(segment, ?alloc, "freeing an allocation the segment does not hold (bug)");
        }
    }

    /// Removes the object at `idx` and releases its replicas (deferred while leased), any upsert in flight and
    /// its group references.
    pub(crate) fn remove_object(&mut self, idx: usize) {
        let Some(o) = self.objects.remove_at(idx) else { return };
        self.groups.release(&o.groups);
        if let Some(up) = o.upsert {
            self.groups.release(&up.protection.groups);
            self.release_replicas(up.replicas, 0);
        }
        if !self.copies.is_empty() {
            if let Some(copy) = self.copies.remove(o.key.as_str()) {
                self.release_replicas(copy.replicas, 0);
            }
        }
        self.release_replicas(o.replicas, o.read_until);
    }

    fn release_deferred(&mut self, now: u64) -> u64 {
        let (due, keep): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.deferred).into_iter().partition(|d| d.release_at <= now);
        self.deferred = keep;
        let released = due.len() as u64;
        for d in due {
            self.free_allocation(d.segment, d.alloc);
        }
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::master::ManualClock;
    use crate::master::testing::{cfg, harness, quiet};
    use crate::types::ReplicateConfig;

    #[test]
    fn new_rejects_bad_config() {
        let bad = MasterConfig { eviction_ratio: 2.0, ..Default::default() };
        assert!(matches!(MasterCore::new(bad, Box::new(ManualClock::new(0)), 0), Err(ErrorCode::InvalidParams)));
    }

    #[test]
    fn stats_segments_and_query_key_describe_the_state() {
        let mut h = harness(quiet());
        h.mount(1, "a", "h1", 1 << 20);
        h.mount(2, "b", "h2", 1 << 20);
        let rc = ReplicateConfig { with_soft_pin: true, group_ids: vec!["g".into()], ..cfg(2) };
        h.put_with("k", 1000, &rc).unwrap();
        h.core.put_start(ClientId(1), "w", 5, &cfg(1)).unwrap();
        let s = h.core.stats();
        assert_eq!(
            s,
            MasterStats {
                key_count: 2,
                allocated_bytes: 2 * 1000 + 8,
                total_capacity_bytes: 2 << 20,
                active_clients: 2,
                evicted_key_count: 0,
                mounted_segments: 2,
                suspect_segments: 0,
            }
        );
        let segs = h.core.segments();
        assert_eq!(segs.len(), 2);
        assert_eq!((segs[0].name.as_str(), segs[0].host.as_str(), segs[0].owner), ("a", "h1", ClientId(1)));
        assert!(segs.iter().all(|s| s.healthy && s.size == 1 << 20));
        assert_eq!(segs.iter().map(|s| s.used).sum::<u64>(), 2008);
        let info = h.core.query_key("k").unwrap();
        assert_eq!((info.size, info.replicas.len(), info.hard_pinned), (1000, 2, false));
        assert_eq!((info.lease_remaining_ms, info.soft_pin_remaining_ms), (0, 1_800_000));
        assert_eq!(info.group_ids, ["g"]);
        assert_eq!(h.core.query_key("w").unwrap().replicas[0].status, ReplicaStatus::Processing);
        assert!(format!("{:?}", h.core).contains("key_count: 2"));
    }

    /// Segments of different clients may together exceed 2^64 bytes: usage is summed without overflow (it used
    /// to panic in debug builds and wrap in release builds, which skewed the watermark), stats saturate, and the
    /// watermark still compares the true totals.
    #[test]
    fn usage_of_segments_beyond_2_pow_64_bytes_in_total() {
        use crate::types::Segment;
        let mut h = harness(quiet());
        let seg = |name: &str, size: u64| Segment {
            name: name.into(),
            transport_endpoint: format!("{name}@ep"),
            base: 0,
            size,
            host: name.into(),
            protocol: String::new(),
        };
        h.core.mount_segment(ClientId(1), seg("a", 1 << 63)).unwrap();
        h.core.mount_segment(ClientId(2), seg("b", 1 << 63)).unwrap();
        h.core.mount_segment(ClientId(3), seg("c", 1 << 20)).unwrap();
        assert_eq!(h.core.usage(), (0, (1 << 64) + (1 << 20)));
        for i in 0..80 {
            h.put_with(&format!("k{i}"), 4096, &cfg(3)).unwrap();
        }
        assert_eq!(h.core.usage().0, 3 * 80 * 4096);
        let s = h.core.stats();
        assert_eq!((s.allocated_bytes, s.total_capacity_bytes), (3 * 80 * 4096, u64::MAX));
        // A capacity wrapped to 1 MiB would put these 960 KiB over the 90% watermark; the true usage is tiny.
        for _ in 0..3 {
            assert_eq!(h.core.tick().evicted_objects, 0);
        }
        // Filling the huge segments past the watermark (and past 2^64 reserved bytes) does trigger eviction.
        h.core.mount_segment(ClientId(4), seg("d", 1 << 62)).unwrap();
        let on = |s: &str| ReplicateConfig { preferred_segments: vec![s.into()], ..cfg(1) };
        h.put_with("big-a", (1 << 63) - (1 << 20), &on("a")).unwrap();
        h.put_with("big-b", (1 << 63) - (1 << 20), &on("b")).unwrap();
        h.put_with("big-d", (1 << 62) - (1 << 20), &on("d")).unwrap();
        assert!(h.core.usage().0 > 1 << 64);
        assert_eq!(h.core.stats().allocated_bytes, u64::MAX);
        h.core.tick(); // the first pass protects everything admitted before it
        assert!(h.core.tick().evicted_objects > 0);
        h.check();
    }
}
