//! The shared CXL pool of a master started with `--enable_cxl` (upstream's CXL allocation strategy).
//!
//! Every client with `protocol = "cxl"` maps the same shared area of one CXL device and mounts a *view* of it: a
//! segment with protocol `cxl` whose `base` is the area's offset in the device and whose `size` is the area's
//! length. The master does not give views allocators of their own (they would hand out the same bytes twice);
//! it keeps one allocator for the pool, standing in the segment table as the segment [`CXL_POOL_SEGMENT`], and
//! places every object there, one replica each (the bytes are shared; more copies of them in the same memory
//! would protect nothing).
//!
//! A pool replica is described with the pool's name, the offset `base + allocation offset` as its address, and
//! as endpoint the transfer endpoint of a client holding a view (one that is not suspect, when there is one).
//! A client holding a view reads and writes such replicas directly in its own mapping; any other engine that
//! maps the device reaches them through the `cxl` transport at that offset. The pool outlives its views: when
//! the last one goes, objects stay (nobody can read them until a view is mounted again).
//!
//! The first view fixes where the pool lies: its base, and its size (the smaller of the view's and
//! `--cxl_size`). While the pool holds objects or other views, a view with another base (another device or
//! area) or a smaller size is refused with `InvalidParams`; an empty, unviewed pool takes the next view's.

use super::core::MasterCore;
use super::objects::{Replica, Replicas};
use super::segments::{ClientState, SegmentState};
use crate::allocator::OffsetAllocator;
use crate::types::{CXL_POOL_SEGMENT, ClientId, CxlPoolConfig, ErrorCode, Result, Segment};

/// A client's view of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CxlView {
    pub(crate) client: ClientId,
    pub(crate) info: Segment,
}

/// The pool's slot in the segment table and the views mounted on it.
#[derive(Debug)]
pub(crate) struct CxlPool {
    pub(crate) config: CxlPoolConfig,
    pub(crate) slot: u32,
    pub(crate) views: Vec<CxlView>,
}

/// The pool's entry in the segment table before any view: no base, the configured size, suspect (no
/// placements, no reads).
pub(crate) fn pool_segment(config: &CxlPoolConfig) -> SegmentState {
    SegmentState {
        info: Segment {
            name: CXL_POOL_SEGMENT.into(),
            transport_endpoint: String::new(),
            base: 0,
            size: config.size,
            host: String::new(),
            protocol: "cxl".into(),
        },
        owner: ClientId(0),
        alloc: OffsetAllocator::new(config.size),
        suspect: true,
    }
}

impl MasterCore {
    /// True for the pool's slot.
    pub(crate) fn is_cxl_pool(&self, slot: u32) -> bool {
        self.cxl.as_ref().is_some_and(|p| p.slot == slot)
    }

    /// Mounts `client`'s view of the pool (a segment with protocol `cxl`); see the module docs for what is
    /// refused. Mounting the same view again counts as a ping.
    pub(crate) fn mount_cxl_view(&mut self, client: ClientId, segment: Segment) -> Result<()> {
        let Some(pool) = self.cxl.as_ref() else {
            tracing::warn!(segment = %segment.name, "a CXL segment was mounted, but this master has no CXL pool: start it with --enable_cxl=true");
            return Err(ErrorCode::InvalidParams);
        };
        if let Some(view) = pool.views.iter().find(|v| v.info.name == segment.name) {
            if view.client != client || view.info != segment {
                return Err(ErrorCode::SegmentAlreadyExists);
            }
            self.touch_client(client, &segment.host);
            return Ok(());
        }
        if self.segments.find(&segment.name).is_some() {
            return Err(ErrorCode::SegmentAlreadyExists);
        }
        let slot = pool.slot;
        let limit = pool.config.size;
        let unviewed = pool.views.is_empty();
        let state = self.segments.get_mut(slot).ok_or(ErrorCode::Internal)?;
        if unviewed && state.alloc.used_bytes() == 0 {
            let size = limit.min(segment.size);
            state.info.base = segment.base;
            state.info.size = size;
            state.alloc = OffsetAllocator::new(size);
        } else if segment.base != state.info.base || segment.size < state.info.size {
            tracing::warn!(
                segment = %segment.name,
                base = segment.base,
                size = segment.size,
                pool_base = state.info.base,
                pool_size = state.info.size,
                "refusing a CXL view that does not cover the pool (another device or shared area?)"
            );
            return Err(ErrorCode::InvalidParams);
        }
        let host = segment.host.clone();
        if let Some(pool) = self.cxl.as_mut() {
            pool.views.push(CxlView { client, info: segment });
        }
        self.touch_client(client, &host);
        self.refresh_cxl_pool();
        Ok(())
    }

    /// Removes `client`'s view called `name`; false when it has none. Objects stay in the pool.
    pub(crate) fn unmount_cxl_view(&mut self, client: ClientId, name: &str) -> bool {
        let Some(pool) = self.cxl.as_mut() else { return false };
        let before = pool.views.len();
        pool.views.retain(|v| !(v.client == client && v.info.name == name));
        let removed = pool.views.len() != before;
        if removed {
            self.refresh_cxl_pool();
        }
        removed
    }

    /// Drops every view of `clients` (expired).
    pub(crate) fn drop_cxl_views(&mut self, clients: &[ClientId]) {
        if let Some(pool) = self.cxl.as_mut() {
            pool.views.retain(|v| !clients.contains(&v.client));
            self.refresh_cxl_pool();
        }
    }

    /// Owners of views whose name or endpoint is `target`.
    pub(crate) fn cxl_view_owners(&self, target: &str) -> Vec<ClientId> {
        self.cxl.as_ref().map_or_else(Vec::new, |p| {
            p.views
                .iter()
                .filter(|v| v.info.name == target || v.info.transport_endpoint == target)
                .map(|v| v.client)
                .collect()
        })
    }

    /// Points the pool's endpoint at a view whose client is not suspect (else any view) and makes the pool
    /// healthy exactly when such a client exists.
    pub(crate) fn refresh_cxl_pool(&mut self) {
        let Some(pool) = self.cxl.as_ref() else { return };
        let healthy = |v: &&CxlView| self.clients.get(&v.client).is_some_and(|c| !c.suspect);
        let pick = pool.views.iter().find(healthy).or(pool.views.first());
        let endpoint = pick.map(|v| v.info.transport_endpoint.clone()).unwrap_or_default();
        let usable = pool.views.iter().any(|v| healthy(&v));
        let slot = pool.slot;
        if let Some(state) = self.segments.get_mut(slot) {
            state.info.transport_endpoint = endpoint;
            state.suspect = !usable;
        }
    }

    /// One replica of `len` bytes in the pool (after one eviction pass when full and `may_evict`).
    pub(crate) fn place_in_cxl_pool(&mut self, slot: u32, len: u64, may_evict: &mut bool) -> Result<Replicas> {
        if !self.segments.is_healthy(slot) {
            return Err(ErrorCode::NoAvailableHandle);
        }
        let mut alloc = self.segments.get_mut(slot).and_then(|s| s.alloc.allocate(len));
        if alloc.is_none() && *may_evict {
            *may_evict = false;
            self.evict(self.now(), len);
            alloc = self.segments.get_mut(slot).and_then(|s| s.alloc.allocate(len));
        }
        let alloc = alloc.ok_or(ErrorCode::NoAvailableHandle)?;
        let mut replicas = Replicas::new();
        replicas.push(Replica { segment: slot, alloc });
        Ok(replicas)
    }

    /// Makes `client` known (with `host`) and alive.
    fn touch_client(&mut self, client: ClientId, host: &str) {
        let now = self.now();
        let state = self.clients.entry(client).or_insert_with(|| ClientState {
            last_seen: now,
            reported_unreachable: false,
            suspect: false,
            host: None,
            segments: Vec::new(),
        });
        state.host = Some(host.to_string());
        self.mark_alive(client);
    }
}

#[cfg(test)]
mod tests {
    use crate::master::testing::{cfg, harness, quiet};
    use crate::types::{
        AllocationStrategy, CXL_POOL_SEGMENT, ClientId, CxlPoolConfig, ErrorCode, MasterConfig, ReplicateConfig,
        Segment,
    };

    const MIB: u64 = 1 << 20;

    fn cxl_config(size: u64) -> MasterConfig {
        MasterConfig { cxl: Some(CxlPoolConfig { path: "/dev/dax0.0".into(), size }), ..quiet() }
    }

    fn view(name: &str, base: u64, size: u64) -> Segment {
        Segment {
            name: name.into(),
            transport_endpoint: format!("{name}@ep"),
            base,
            size,
            host: "h".into(),
            protocol: "cxl".into(),
        }
    }

    #[test]
    fn objects_go_to_the_pool_once_and_are_described_by_offset() {
        let mut h = harness(cxl_config(64 * MIB));
        // No view yet: nowhere to put anything.
        assert_eq!(h.core.put_start(ClientId(1), "k", 100, &cfg(1)).unwrap_err(), ErrorCode::NoAvailableHandle);
        h.core.mount_segment(ClientId(1), view("a", 2 * MIB, 32 * MIB)).unwrap();
        h.core.mount_segment(ClientId(2), view("b", 2 * MIB, 40 * MIB)).unwrap();
        // An ordinary segment next to the pool gets nothing: the pool takes every object.
        h.mount(3, "dram", "h", 64 * MIB);
        let placed = h.put_with("k", 1000, &cfg(3)).unwrap();
        assert_eq!(placed.len(), 1, "one replica in shared memory");
        let r = &placed[0];
        assert_eq!(r.segment, CXL_POOL_SEGMENT);
        assert!(r.addr >= 2 * MIB && r.addr + 1000 <= 2 * MIB + 32 * MIB, "offset inside the smallest view");
        assert_eq!(r.transport_endpoint, "a@ep");
        // The pool is sized by the first view (32 MiB < --cxl_size): a 33 MiB object does not fit.
        assert_eq!(h.core.put_start(ClientId(1), "big", 33 * MIB, &cfg(1)).unwrap_err(), ErrorCode::NoAvailableHandle);
        let stats = h.core.stats();
        assert_eq!(stats.total_capacity_bytes, 32 * MIB + 64 * MIB);
        h.check();
    }

    #[test]
    fn views_that_do_not_cover_the_pool_are_refused() {
        let mut h = harness(cxl_config(16 * MIB));
        h.core.mount_segment(ClientId(1), view("a", 2 * MIB, 32 * MIB)).unwrap();
        assert_eq!(h.core.mount_segment(ClientId(2), view("b", 4 * MIB, 32 * MIB)), Err(ErrorCode::InvalidParams));
        assert_eq!(h.core.mount_segment(ClientId(2), view("b", 2 * MIB, 8 * MIB)), Err(ErrorCode::InvalidParams));
        // --cxl_size capped the pool at 16 MiB: a 16 MiB view covers it.
        h.core.mount_segment(ClientId(2), view("b", 2 * MIB, 16 * MIB)).unwrap();
        // Same view again: a ping. Same name, another client or layout: taken.
        h.core.mount_segment(ClientId(2), view("b", 2 * MIB, 16 * MIB)).unwrap();
        assert_eq!(
            h.core.mount_segment(ClientId(3), view("b", 2 * MIB, 16 * MIB)),
            Err(ErrorCode::SegmentAlreadyExists)
        );
        assert_eq!(
            h.core.mount_segment(ClientId(3), view(CXL_POOL_SEGMENT, 2 * MIB, 16 * MIB)),
            Err(ErrorCode::SegmentAlreadyExists)
        );
        h.check();
    }

    #[test]
    fn a_master_without_a_pool_refuses_views_and_the_strategy_needs_one() {
        let mut h = harness(quiet());
        assert_eq!(h.core.mount_segment(ClientId(1), view("a", 2 * MIB, 32 * MIB)), Err(ErrorCode::InvalidParams));
        let bad = MasterConfig { allocation_strategy: AllocationStrategy::Cxl, ..Default::default() };
        assert_eq!(bad.validate(), Err(ErrorCode::InvalidParams));
        let tiny = MasterConfig { cxl: Some(CxlPoolConfig { path: "p".into(), size: 4 }), ..Default::default() };
        assert_eq!(tiny.validate(), Err(ErrorCode::InvalidParams));
    }

    #[test]
    fn objects_outlive_views_and_are_served_through_any_live_one() {
        let mut h = harness(cxl_config(64 * MIB));
        h.core.mount_segment(ClientId(1), view("a", MIB, 32 * MIB)).unwrap();
        h.core.mount_segment(ClientId(2), view("b", MIB, 32 * MIB)).unwrap();
        let addr = h.put("k", 4096).unwrap()[0].addr;
        h.core.unmount_segment(ClientId(1), "a").unwrap();
        let (replicas, _) = h.core.get_replica_list("k").unwrap();
        assert_eq!((replicas[0].addr, replicas[0].transport_endpoint.as_str()), (addr, "b@ep"));
        // The last view gone: the object stays, unreadable until a view comes back.
        h.core.unmount_segment(ClientId(2), "b").unwrap();
        assert_eq!(h.core.get_replica_list("k").unwrap_err(), ErrorCode::UnavailableInCurrentStatus);
        assert_eq!(h.core.unmount_segment(ClientId(2), "b"), Err(ErrorCode::SegmentNotFound));
        // A view of another area cannot take over a pool that holds objects.
        assert_eq!(h.core.mount_segment(ClientId(3), view("c", 8 * MIB, 32 * MIB)), Err(ErrorCode::InvalidParams));
        h.core.mount_segment(ClientId(3), view("c", MIB, 32 * MIB)).unwrap();
        assert_eq!(h.core.get_replica_list("k").unwrap().0[0].addr, addr);
        h.check();
    }

    #[test]
    fn expired_and_suspect_clients_lose_their_views() {
        let mut h = harness(MasterConfig {
            cxl: Some(CxlPoolConfig::default()),
            client_ttl_ms: 10_000,
            client_suspect_after_ms: 3_000,
            ..Default::default()
        });
        h.core.mount_segment(ClientId(1), view("a", MIB, 32 * MIB)).unwrap();
        h.core.mount_segment(ClientId(2), view("b", MIB, 32 * MIB)).unwrap();
        h.put("k", 10).unwrap();
        // Client 1 reported unreachable: the pool is served through client 2.
        h.core.report_unreachable("a@ep").unwrap();
        assert_eq!(h.core.get_replica_list("k").unwrap().0[0].transport_endpoint, "b@ep");
        // Only client 2 keeps pinging; client 1 expires and its view goes, the object stays.
        for _ in 0..12 {
            h.clock.advance(1_000);
            h.core.ping(ClientId(2));
            h.core.tick();
        }
        assert!(!h.core.cxl.as_ref().unwrap().views.iter().any(|v| v.client == ClientId(1)));
        assert!(h.core.exist("k").unwrap());
        h.check();
    }

    #[test]
    fn a_full_pool_evicts_before_refusing() {
        let mut h = harness(cxl_config(MIB));
        h.core.mount_segment(ClientId(1), view("a", MIB, MIB)).unwrap();
        h.put("old", 512 << 10).unwrap();
        h.clock.advance(1_000);
        h.put("newer", 448 << 10).unwrap();
        h.clock.advance(60_000);
        h.core.tick(); // an eviction pass protects what was admitted before it; the next one may take it
        let placed = h.put_with("more", 512 << 10, &ReplicateConfig::default()).unwrap();
        assert_eq!(placed[0].segment, CXL_POOL_SEGMENT);
        assert!(h.core.stats().evicted_key_count > 0);
        h.check();
    }
}
