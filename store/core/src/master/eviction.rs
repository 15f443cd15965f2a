//! Eviction: frees space by removing roughly least-recently-used objects.
//!
//! A pass runs from `tick` when reserved bytes reach `eviction_high_watermark_ratio` of capacity, and from a
//! put or upsert that found no space (at most one pass per request or batch). It removes about
//! `eviction_ratio` of the objects (at least one); a pass for a put keeps going until it has also removed the
//! bytes the put needs, but never past four times that count.
//!
//! Rules, in order:
//! 1. Never evicted: objects being written (first put or upsert in flight), leased objects (a reader got them
//!    via exist/get within `default_kv_lease_ttl_ms`), hard-pinned objects, soft-pinned objects when
//!    `allow_evict_soft_pinned_objects` is false, and objects admitted (`put_end`) since the
//!    previous pass started (tracked with an epoch counter bumped at the start of each pass). The last rule fixes
//!    an upstream bug where the pass right after an object's admission could evict it before any reader saw it:
//!    every object survives at least the first pass after its admission. The core starts as if a pass had just
//!    begun, so the very first pass evicts nothing admitted before it; the next one can.
//! 2. Objects sharing a group id (directly or through a chain of shared ids) form one unit: evicted together,
//!    and skipped entirely if any member is protected by rule 1.
//! 3. Order: objects (units) not soft-pinned first, then soft-pinned ones; within each class the least recently
//!    used first (a unit's recency is that of its most recently used member). Selection is O(n) plus a sort of
//!    the selected few.

use std::collections::HashMap;

use super::core::MasterCore;
use super::objects::Object;

/// How far a pass for a put may go beyond `eviction_ratio` of the objects to free the bytes the put needs.
const MAX_PASS_MULTIPLIER: usize = 4;

/// Something that can be evicted: one object, or a whole group unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Object(u32),
    Group(u32),
}

/// A group unit: connected objects, with the aggregate class and recency.
#[derive(Debug, Default)]
struct Unit {
    members: Vec<u32>,
    protected: bool,
    class: u8,
    last_access: u64,
}

/// Union-find over group ids, to merge groups that share an object.
struct UnionFind {
    parent: Vec<u32>,
}

impl UnionFind {
    fn new(n: usize) -> Self {
        UnionFind { parent: (0..n as u32).collect() }
    }

    fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let grandparent = self.parent[self.parent[x as usize] as usize];
            self.parent[x as usize] = grandparent;
            x = grandparent;
        }
        x
    }

    fn union(&mut self, a: u32, b: u32) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.parent[ra as usize] = rb;
        }
    }
}

impl MasterCore {
    /// Runs one eviction pass (see the module docs) and returns the number of objects removed. `need_bytes` is
    /// the space a waiting put needs (0 from `tick`).
    pub(crate) fn evict(&mut self, now: u64, need_bytes: u64) -> u64 {
        let protected_epoch = self.eviction_epoch;
        self.eviction_epoch = self.eviction_epoch.wrapping_add(1);
        let n = self.objects.len();
        if n == 0 {
            return 0;
        }
        let base = ((n as f64 * self.config.eviction_ratio).ceil() as usize).clamp(1, n);
        let cap = if need_bytes > 0 { base.saturating_mul(MAX_PASS_MULTIPLIER).min(n) } else { base };
        let allow_soft = self.config.allow_evict_soft_pinned_objects;
        // Class 0: plain, 1: soft-pinned; None: protected.
        let class_of = |o: &Object| -> Option<u8> {
            if o.is_writing()
                || (!self.copies.is_empty() && self.copies.contains_key(o.key.as_str()))
                || o.hard_pin
                || o.is_leased(now)
                || o.admitted_epoch == protected_epoch
            {
                None
            } else if o.is_soft_pinned(now) {
                allow_soft.then_some(1)
            } else {
                Some(0)
            }
        };

        let mut uf = UnionFind::new(self.groups.id_bound());
        for o in self.objects.iter() {
            if let Some(ids) = &o.groups {
                for w in ids.windows(2) {
                    uf.union(w[0], w[1]);
                }
            }
        }
        let mut candidates: Vec<(u8, u64, Target)> = Vec::new();
        let mut units: HashMap<u32, Unit> = HashMap::new();
        for (i, o) in self.objects.iter().enumerate() {
            let class = class_of(o);
            match o.groups.as_deref().and_then(|ids| ids.first()) {
                None => {
                    if let Some(c) = class {
                        candidates.push((c, o.last_access, Target::Object(i as u32)));
                    }
                }
                Some(&id) => {
                    let unit = units.entry(uf.find(id)).or_default();
                    unit.members.push(i as u32);
                    match class {
                        None => unit.protected = true,
                        Some(c) => {
                            unit.class = unit.class.max(c);
                            unit.last_access = unit.last_access.max(o.last_access);
                        }
                    }
                }
            }
        }
        for (&root, unit) in &units {
            if !unit.protected {
                candidates.push((unit.class, unit.last_access, Target::Group(root)));
            }
        }
        if cap < candidates.len() {
            candidates.select_nth_unstable(cap);
            candidates.truncate(cap);
        }
        candidates.sort_unstable();

        let mut victims: Vec<u32> = Vec::new();
        let mut freed = 0u64;
        for (_, _, target) in &candidates {
            if victims.len() >= base && freed >= need_bytes {
                break;
            }
            let members: &[u32] = match target {
                Target::Object(i) => std::slice::from_ref(i),
                Target::Group(root) => units.get(root).map_or(&[][..], |u| u.members.as_slice()),
            };
            for &i in members {
                if let Some(o) = self.objects.get(i as usize) {
                    let bytes = o.replicas.iter().fold(0u64, |sum, r| sum.saturating_add(r.alloc.reserved()));
                    freed = freed.saturating_add(bytes);
                    victims.push(i);
                }
            }
        }
        victims.sort_unstable_by(|a, b| b.cmp(a));
        for &i in &victims {
            self.remove_object(i as usize);
        }
        self.evicted_total += victims.len() as u64;
        if !victims.is_empty() {
            tracing::debug!(evicted = victims.len(), freed, need_bytes, "eviction pass");
        }
        victims.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use crate::master::testing::{Harness, cfg, harness, quiet};
    use crate::types::{ClientId, ErrorCode, MasterConfig, ReplicateConfig};

    const OBJ: u64 = 10 * 1024;

    /// One 100 KiB segment (room for 10 objects of 10 KiB); objects put 10 ms apart, oldest first.
    fn setup(config: MasterConfig, keys: &[&str]) -> Harness {
        let mut h = harness(config);
        h.mount(1, "a", "h", 10 * OBJ);
        for k in keys {
            h.put(k, OBJ).unwrap();
            h.advance(10);
        }
        h
    }

    fn pass(h: &mut Harness) -> u64 {
        let now = h.core.now();
        let n = h.core.evict(now, 0);
        h.check();
        n
    }

    fn ratio(r: f64) -> MasterConfig {
        MasterConfig { eviction_ratio: r, ..quiet() }
    }

    #[test]
    fn watermark_triggers_lru_pass_after_the_first() {
        let keys = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8"];
        let mut h = setup(ratio(0.2), &keys);
        assert_eq!(h.core.tick().evicted_objects, 0, "first pass protects everything admitted before it");
        assert_eq!(h.core.tick().evicted_objects, 2);
        assert!(!h.has("k0") && !h.has("k1") && h.has("k2"));
        assert_eq!(h.core.tick().evicted_objects, 0, "70% is under the watermark");
        assert_eq!(h.core.stats().evicted_key_count, 2);
        h.check();
    }

    #[test]
    fn under_the_watermark_nothing_is_evicted() {
        let mut h = setup(ratio(0.5), &["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7"]);
        for _ in 0..3 {
            assert_eq!(h.core.tick().evicted_objects, 0);
        }
    }

    #[test]
    fn recently_read_objects_go_last() {
        let mut h = setup(ratio(0.2), &["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8"]);
        assert_eq!(pass(&mut h), 0);
        h.core.exist("k0").unwrap();
        h.core.get_replica_list("k1").unwrap();
        h.advance(10_000); // leases over
        assert_eq!(pass(&mut h), 2);
        assert!(h.has("k0") && h.has("k1") && !h.has("k2") && !h.has("k3"));
    }

    #[test]
    fn objects_admitted_since_the_previous_pass_started_survive() {
        let mut h = setup(ratio(1.0), &["a", "b"]);
        assert_eq!(pass(&mut h), 0);
        h.put("c", OBJ).unwrap();
        assert_eq!(pass(&mut h), 2);
        assert!(h.has("c"));
        assert_eq!(pass(&mut h), 1);
        assert!(!h.has("c"));
    }

    #[test]
    fn leased_pinned_and_in_flight_objects_are_never_evicted() {
        let mut h = setup(ratio(1.0), &["plain", "leased", "upserting"]);
        h.put_with("hard", OBJ, &ReplicateConfig { with_hard_pin: true, ..cfg(1) }).unwrap();
        h.core.put_start(ClientId(1), "writing", OBJ, &cfg(1)).unwrap();
        h.core.upsert_start(ClientId(1), "upserting", 100, &cfg(1)).unwrap();
        assert_eq!(pass(&mut h), 0);
        h.core.exist("leased").unwrap();
        assert_eq!(pass(&mut h), 1);
        assert!(!h.has("plain"));
        for k in ["leased", "upserting", "hard", "writing"] {
            assert!(h.has(k), "{k}");
        }
        h.advance(10_000);
        assert_eq!(pass(&mut h), 1, "the lease ran out");
        assert!(!h.has("leased"));
    }

    #[test]
    fn soft_pinned_objects_go_after_all_others() {
        let soft = ReplicateConfig { with_soft_pin: true, soft_pin_ttl_ms: Some(60_000), ..cfg(1) };
        let mut h = setup(ratio(0.2), &[]);
        h.put_with("soft", OBJ, &soft).unwrap();
        h.advance(10);
        for k in ["p1", "p2", "p3", "p4"] {
            h.put(k, OBJ).unwrap();
            h.advance(10);
        }
        assert_eq!(pass(&mut h), 0);
        for gone in ["p1", "p2", "p3", "p4", "soft"] {
            assert_eq!(pass(&mut h), 1);
            assert!(!h.has(gone), "{gone} should be the next victim");
        }
    }

    #[test]
    fn soft_pinned_objects_stay_when_not_allowed_until_the_pin_ends() {
        let soft = ReplicateConfig { with_soft_pin: true, soft_pin_ttl_ms: Some(60_000), ..cfg(1) };
        let mut h = setup(MasterConfig { allow_evict_soft_pinned_objects: false, ..ratio(1.0) }, &[]);
        h.put_with("soft", OBJ, &soft).unwrap();
        h.put("plain", OBJ).unwrap();
        assert_eq!(pass(&mut h), 0);
        assert_eq!(pass(&mut h), 1);
        assert_eq!(pass(&mut h), 0);
        h.advance(60_000);
        assert_eq!(pass(&mut h), 1);
        assert!(!h.has("soft"));
    }

    #[test]
    fn soft_pin_ttl_is_capped_and_extended_by_reads() {
        let mut h = setup(quiet(), &[]);
        let long = ReplicateConfig { with_soft_pin: true, soft_pin_ttl_ms: Some(u64::MAX), ..cfg(1) };
        h.put_with("long", 10, &long).unwrap();
        assert_eq!(h.core.query_key("long").unwrap().soft_pin_remaining_ms, 24 * 3600 * 1000);
        h.put_with("default", 10, &ReplicateConfig { with_soft_pin: true, ..cfg(1) }).unwrap();
        h.advance(1000);
        assert_eq!(h.core.query_key("default").unwrap().soft_pin_remaining_ms, 1_799_000);
        h.core.exist("default").unwrap();
        assert_eq!(h.core.query_key("default").unwrap().soft_pin_remaining_ms, 1_800_000);
    }

    #[test]
    fn groups_are_evicted_together_or_not_at_all() {
        let g = |ids: &[&str]| ReplicateConfig { group_ids: ids.iter().map(|s| s.to_string()).collect(), ..cfg(1) };
        let mut h = setup(ratio(0.1), &[]);
        h.put_with("g1-old", OBJ, &g(&["g1"])).unwrap();
        h.advance(10);
        h.put("plain", OBJ).unwrap();
        h.advance(10);
        h.put_with("g1-new", OBJ, &g(&["g1"])).unwrap();
        assert_eq!(pass(&mut h), 0);
        // The unit's recency is its newest member's, so "plain" is older than the group.
        assert_eq!(pass(&mut h), 1);
        assert!(!h.has("plain"));
        assert_eq!(pass(&mut h), 2);
        assert_eq!(h.core.stats().key_count, 0);

        // A protected member shields the whole group.
        h.put_with("x", OBJ, &g(&["g2"])).unwrap();
        h.put_with("y", OBJ, &g(&["g2"])).unwrap();
        h.put("z", OBJ).unwrap();
        assert_eq!(pass(&mut h), 0);
        h.core.exist("y").unwrap();
        assert_eq!(pass(&mut h), 1);
        assert!(h.has("x") && h.has("y") && !h.has("z"));
        assert_eq!(pass(&mut h), 0);
    }

    #[test]
    fn groups_chain_through_shared_ids() {
        let g = |ids: &[&str]| ReplicateConfig { group_ids: ids.iter().map(|s| s.to_string()).collect(), ..cfg(1) };
        let mut h = setup(ratio(0.1), &[]);
        h.put_with("x", OBJ, &g(&["g1", "g2"])).unwrap();
        h.put_with("y", OBJ, &g(&["g2"])).unwrap();
        h.put_with("z", OBJ, &g(&["g1"])).unwrap();
        h.advance(10);
        h.put("w", OBJ).unwrap();
        assert_eq!(pass(&mut h), 0);
        assert_eq!(pass(&mut h), 3);
        assert!(h.has("w"));
        assert!(h.core.groups.ref_counts().is_empty());
    }

    #[test]
    fn a_put_that_finds_no_space_evicts_what_it_needs() {
        let keys = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9"];
        let mut h = setup(quiet(), &keys);
        // The pass run by this put is the first: everything was admitted since the core started.
        assert_eq!(h.put("new", OBJ), Err(ErrorCode::NoAvailableHandle));
        // The next one may evict; it frees three neighbours for a 30 KiB object (ratio alone would take one).
        h.put("new", 3 * OBJ).unwrap();
        assert_eq!(h.core.stats().evicted_key_count, 3);
        assert!(!h.has("k0") && !h.has("k1") && !h.has("k2") && h.has("k3"));
        h.check();
    }
}
