//! Where replicas go. Each replica of one write lands on a distinct healthy (non-suspect) segment, chosen in
//! this order until enough replicas are placed:
//! 1. the write's `preferred_segments`, in the order given;
//! 2. segments on the caller's host, when the strategy is `local_first` or the write sets
//!    `prefer_alloc_in_same_node` (the caller's host is the host of the segment it mounted last; a client
//!    that mounted nothing has no host);
//! 3. the rest, by the configured strategy: `random` (and `local_first`) picks uniformly among segments that
//!    have a fitting free block; `free_ratio_first` tries the segment with the highest free ratio first.
//!
//! Placement is best effort: with fewer healthy segments (or segments with room) than `replica_num`, the write
//! gets as many replicas as could be placed, and fails with `NoAvailableHandle` only when none could. Upstream
//! does the same; it keeps a small cluster usable when a node is down.

use super::core::MasterCore;
use super::objects::{Replica, Replicas};
use crate::types::{AllocationStrategy, ClientId, ErrorCode, ReplicateConfig, Result};

impl MasterCore {
    /// Places up to `cfg.replica_num` replicas of `len` bytes. When space is short and `may_evict` is set, runs
    /// one eviction pass (clearing `may_evict`) and tries again for the missing replicas.
    pub(crate) fn place_replicas(
        &mut self,
        client: ClientId,
        len: u64,
        cfg: &ReplicateConfig,
        may_evict: &mut bool,
    ) -> Result<Replicas> {
        if let Some(slot) = self.cxl.as_ref().map(|p| p.slot) {
            return self.place_in_cxl_pool(slot, len, may_evict);
        }
        let healthy = self.segments.iter().filter(|(_, s)| !s.suspect).count();
        let want = cfg.replica_num.min(healthy);
        if want == 0 || !self.segments.iter().any(|(_, s)| !s.suspect && s.alloc.capacity() >= len) {
            return Err(ErrorCode::NoAvailableHandle);
        }
        let mut replicas = self.place(client, len, cfg, want, &mut Replicas::new());
        if replicas.len() < want && *may_evict {
            *may_evict = false;
            let missing = want - replicas.len();
            self.evict(self.now(), len.saturating_mul(missing as u64));
            replicas = self.place(client, len, cfg, want, &mut replicas);
        }
        if replicas.is_empty() { Err(ErrorCode::NoAvailableHandle) } else { Ok(replicas) }
    }

    /// Extends `placed` to at most `want` replicas on distinct healthy segments, following the module's order.
    fn place(
        &mut self,
        client: ClientId,
        len: u64,
        cfg: &ReplicateConfig,
        want: usize,
        placed: &mut Replicas,
    ) -> Replicas {
        let mut placed = std::mem::take(placed);
        for name in &cfg.preferred_segments {
            if placed.len() >= want {
                return placed;
            }
            if let Some(idx) = self.segments.find(name) {
                self.try_place(idx, len, &mut placed);
            }
        }
        let mut pool: Vec<u32> = self
            .segments
            .iter()
            .filter(|&(i, s)| !s.suspect && !placed.iter().any(|r| r.segment == i))
            .map(|(i, _)| i)
            .collect();
        let strategy = self.config.allocation_strategy;
        if strategy == AllocationStrategy::LocalFirst || cfg.prefer_alloc_in_same_node {
            if let Some(host) = self.clients.get(&client).and_then(|c| c.host.clone()) {
                let (local, rest): (Vec<u32>, Vec<u32>) =
                    pool.into_iter().partition(|&i| self.segments.get(i).is_some_and(|s| s.info.host == host));
                self.place_from(local, len, want, &mut placed);
                pool = rest;
            }
        }
        self.place_from(pool, len, want, &mut placed);
        placed
    }

    /// Tries the candidates in the configured strategy's order until `want` replicas are placed.
    fn place_from(&mut self, mut candidates: Vec<u32>, len: u64, want: usize, placed: &mut Replicas) {
        if self.config.allocation_strategy == AllocationStrategy::FreeRatioFirst {
            // Highest free/size first; compare by cross-multiplication to stay exact. Ties keep slot order.
            let ratio = |i: &u32| self.segments.get(*i).map_or((0, 1), |s| (s.alloc.free_bytes(), s.info.size.max(1)));
            candidates.sort_by(|a, b| {
                let ((fa, sa), (fb, sb)) = (ratio(a), ratio(b));
                (u128::from(fb) * u128::from(sa)).cmp(&(u128::from(fa) * u128::from(sb)))
            });
            for idx in candidates {
                if placed.len() >= want {
                    return;
                }
                self.try_place(idx, len, placed);
            }
        } else {
            while placed.len() < want && !candidates.is_empty() {
                let pick = self.rng.below(candidates.len());
                let idx = candidates.swap_remove(pick);
                self.try_place(idx, len, placed);
            }
        }
    }

    /// Allocates on segment `idx` if it is healthy, not used by this write yet, and has a fitting block.
    fn try_place(&mut self, idx: u32, len: u64, placed: &mut Replicas) {
        if placed.iter().any(|r| r.segment == idx) {
            return;
        }
        let Some(segment) = self.segments.get_mut(idx) else { return };
        if segment.suspect {
            return;
        }
        if let Some(alloc) = segment.alloc.allocate(len) {
            placed.push(Replica { segment: idx, alloc });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use crate::master::testing::{cfg, harness};
    use crate::types::{AllocationStrategy, ClientId, ErrorCode, MasterConfig, ReplicateConfig};

    const MIB: u64 = 1 << 20;

    fn segments_of(replicas: &[crate::types::ReplicaDescriptor]) -> Vec<String> {
        replicas.iter().map(|r| r.segment.clone()).collect()
    }

    #[test]
    fn replicas_land_on_distinct_segments() {
        let mut h = harness(MasterConfig::default());
        for s in ["a", "b", "c", "d"] {
            h.mount(1, s, "h", MIB);
        }
        for i in 0..50 {
            let r = h.put_with(&format!("k{i}"), 1000, &cfg(3)).unwrap();
            let segs: HashSet<String> = segments_of(&r).into_iter().collect();
            assert_eq!(segs.len(), 3);
            for d in &r {
                assert!(d.addr >= 1 << 40 && d.addr + d.len <= (1 << 40) + MIB);
                assert_eq!(d.transport_endpoint, format!("{}@ep", d.segment));
            }
        }
        h.check();
    }

    #[test]
    fn fewer_segments_than_replicas_places_what_it_can() {
        let mut h = harness(MasterConfig::default());
        assert_eq!(h.put("k", 10), Err(ErrorCode::NoAvailableHandle));
        h.mount(1, "a", "h", MIB);
        h.mount(1, "b", "h", MIB);
        assert_eq!(h.put_with("k", 10, &cfg(3)).unwrap().len(), 2);
        // An object no segment can ever hold fails at once, without evicting anything.
        h.put("small", 10).unwrap();
        assert_eq!(h.put("huge", 2 * MIB), Err(ErrorCode::NoAvailableHandle));
        assert_eq!(h.core.stats().evicted_key_count, 0);
        h.check();
    }

    #[test]
    fn preferred_segments_come_first_in_order() {
        let mut h = harness(MasterConfig::default());
        for s in ["a", "b", "c", "d"] {
            h.mount(1, s, "h", MIB);
        }
        let rc = ReplicateConfig { preferred_segments: vec!["c".into(), "zz".into(), "a".into()], ..cfg(3) };
        let r = h.put_with("k", 100, &rc).unwrap();
        assert_eq!(&segments_of(&r)[..2], ["c", "a"]);
        assert!(["b", "d"].contains(&r[2].segment.as_str()));
        // A full preferred segment is skipped.
        h.put_with("fill", MIB - 200, &ReplicateConfig { preferred_segments: vec!["b".into()], ..cfg(1) }).unwrap();
        let r = h.put_with("k2", 1000, &ReplicateConfig { preferred_segments: vec!["b".into()], ..cfg(1) }).unwrap();
        assert_ne!(r[0].segment, "b");
    }

    #[test]
    fn random_spreads_over_segments_with_room() {
        let mut h = harness(MasterConfig::default());
        for s in ["a", "b", "c"] {
            h.mount(1, s, "h", MIB);
        }
        h.mount(1, "tiny", "h", 64);
        let mut per: HashMap<String, usize> = HashMap::new();
        for i in 0..300 {
            let r = h.put(&format!("k{i}"), 1000).unwrap();
            *per.entry(r[0].segment.clone()).or_default() += 1;
        }
        assert!(!per.contains_key("tiny"));
        for s in ["a", "b", "c"] {
            assert!(per[s] > 60, "{per:?}");
        }
    }

    #[test]
    fn free_ratio_first_prefers_emptiest_segment() {
        let mut h =
            harness(MasterConfig { allocation_strategy: AllocationStrategy::FreeRatioFirst, ..Default::default() });
        h.mount(1, "a", "h", MIB);
        h.mount(1, "b", "h", 4 * MIB);
        h.mount(1, "c", "h", MIB);
        let on = |s: &str| ReplicateConfig { preferred_segments: vec![s.into()], ..cfg(1) };
        h.put_with("x", MIB / 2, &on("a")).unwrap();
        h.put_with("y", 3 * MIB, &on("b")).unwrap();
        // Free ratios: a 0.5, b 0.25, c 1.0.
        let r = h.put_with("k", 100, &cfg(3)).unwrap();
        assert_eq!(segments_of(&r), ["c", "a", "b"]);
    }

    #[test]
    fn local_first_and_same_node_prefer_the_callers_host() {
        for (strategy, same_node) in [(AllocationStrategy::LocalFirst, false), (AllocationStrategy::Random, true)] {
            let mut h = harness(MasterConfig { allocation_strategy: strategy, ..Default::default() });
            h.mount(1, "mine", "h1", MIB);
            h.mount(2, "other1", "h2", MIB);
            h.mount(3, "other2", "h3", MIB);
            let rc = ReplicateConfig { prefer_alloc_in_same_node: same_node, ..cfg(1) };
            for i in 0..20 {
                let r = h.core.put_start(ClientId(1), &format!("k{i}"), 100, &rc).unwrap();
                assert_eq!(r[0].segment, "mine");
            }
            // The local segment full: fall back to the others.
            h.core.put_start(ClientId(1), "big", MIB - 4096, &rc).unwrap();
            let r = h.core.put_start(ClientId(1), "next", 8192, &rc).unwrap();
            assert_ne!(r[0].segment, "mine");
            // A client without segments has no host: plain placement.
            assert!(h.core.put_start(ClientId(9), "anon", 100, &rc).is_ok());
        }
    }
}
