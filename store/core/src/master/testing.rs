//! Test support: a harness around a core with a manual clock, an invariant checker, and a randomized model test
//! that runs random operation sequences and checks the invariants after each step.

use std::collections::HashMap;

use super::core::MasterCore;
use super::objects::ObjectState;
use super::{ManualClock, PingOutcome};
use crate::rng::Rng;
use crate::types::{ClientId, ErrorCode, MasterConfig, ReplicaDescriptor, ReplicateConfig, Result, Segment};

/// A core driven by a manual clock.
pub(crate) struct Harness {
    pub(crate) core: MasterCore,
    pub(crate) clock: ManualClock,
}

pub(crate) fn segment(name: &str, host: &str, size: u64) -> Segment {
    Segment {
        name: name.to_string(),
        transport_endpoint: format!("{name}@ep"),
        base: 1 << 40,
        size,
        host: host.to_string(),
        protocol: String::new(),
    }
}

pub(crate) fn harness(config: MasterConfig) -> Harness {
    let clock = ManualClock::new(1_000);
    let core = MasterCore::new(config, Box::new(clock.clone()), 7).expect("valid config");
    Harness { core, clock }
}

/// Defaults, except that clients never go suspect or expire (for tests that move time a lot).
pub(crate) fn quiet() -> MasterConfig {
    MasterConfig { client_ttl_ms: 1 << 40, client_suspect_after_ms: 1 << 40, ..Default::default() }
}

pub(crate) fn cfg(replica_num: usize) -> ReplicateConfig {
    ReplicateConfig { replica_num, ..Default::default() }
}

impl Harness {
    /// Mounts `name` (size `size`, host `host`) for client `client`.
    pub(crate) fn mount(&mut self, client: u128, name: &str, host: &str, size: u64) {
        self.core.mount_segment(ClientId(client), segment(name, host, size)).expect("mount");
    }

    /// put_start + put_end with `cfg`.
    pub(crate) fn put_with(&mut self, key: &str, len: u64, cfg: &ReplicateConfig) -> Result<Vec<ReplicaDescriptor>> {
        let replicas = self.core.put_start(ClientId(1), key, len, cfg)?;
        self.core.put_end(ClientId(1), key)?;
        Ok(replicas)
    }

    /// put_start + put_end of one replica.
    pub(crate) fn put(&mut self, key: &str, len: u64) -> Result<Vec<ReplicaDescriptor>> {
        self.put_with(key, len, &cfg(1))
    }

    pub(crate) fn advance(&self, ms: u64) {
        self.clock.advance(ms);
    }

    pub(crate) fn has(&self, key: &str) -> bool {
        self.core.objects.find(key).is_some()
    }

    pub(crate) fn check(&self) {
        if let Err(e) = self.core.check_invariants() {
            panic!("invariant broken: {e}");
        }
    }
}

impl MasterCore {
    /// Checks the core's internal invariants: the key index, each allocator, reserved bytes equal to the sum
    /// of live, pending and deferred replicas per segment, distinct replica segments, group reference counts,
    /// client/segment ownership and suspicion, and the zombie deadline.
    pub(crate) fn check_invariants(&self) -> std::result::Result<(), String> {
        self.objects.check()?;
        let mut bytes: HashMap<u32, (u64, usize)> = HashMap::new();
        let mut group_refs: HashMap<u32, u32> = HashMap::new();
        let timeout = self.config.put_start_discard_timeout_ms;
        for o in self.objects.iter() {
            let key = o.key.as_str();
            if o.replicas.is_empty() {
                return Err(format!("{key} has no replicas"));
            }
            let mut sets = vec![(&o.replicas, &o.groups, o.size)];
            if let Some(up) = &o.upsert {
                if o.state == ObjectState::Processing {
                    return Err(format!("{key} has an upsert before its first put ended"));
                }
                if up.replicas.is_empty() {
                    return Err(format!("{key} has an upsert without replicas"));
                }
                if up.started.saturating_add(timeout) < self.next_zombie_check {
                    return Err(format!("{key}: upsert deadline after next zombie check"));
                }
                sets.push((&up.replicas, &up.protection.groups, up.size));
            }
            if let Some(copy) = self.copies.get(key) {
                for r in &copy.replicas {
                    if self.segments.get(r.segment).is_none() || r.alloc.len() != o.size {
                        return Err(format!("{key} has a bad copy replica"));
                    }
                    if o.replicas.iter().any(|q| q.segment == r.segment) {
                        return Err(format!("{key} copies to a segment that holds it already"));
                    }
                    let e = bytes.entry(r.segment).or_default();
                    e.0 += r.alloc.reserved();
                    e.1 += 1;
                }
            }
            if o.state == ObjectState::Processing && o.last_access.saturating_add(timeout) < self.next_zombie_check {
                return Err(format!("{key}: put deadline after next zombie check"));
            }
            for (replicas, groups, size) in sets {
                for (i, r) in replicas.iter().enumerate() {
                    if self.segments.get(r.segment).is_none() {
                        return Err(format!("{key} has a replica on unmounted slot {}", r.segment));
                    }
                    if replicas[..i].iter().any(|q| q.segment == r.segment) {
                        return Err(format!("{key} has two replicas on one segment"));
                    }
                    if r.alloc.len() != size {
                        return Err(format!("{key} replica length differs from object size"));
                    }
                    let e = bytes.entry(r.segment).or_default();
                    e.0 += r.alloc.reserved();
                    e.1 += 1;
                }
                for &id in groups.iter().flatten() {
                    *group_refs.entry(id).or_default() += 1;
                }
            }
        }
        for d in &self.deferred {
            let e = bytes.entry(d.segment).or_default();
            e.0 += d.alloc.reserved();
            e.1 += 1;
        }
        if group_refs != self.groups.ref_counts() {
            return Err("group reference counts disagree".into());
        }
        for (idx, s) in self.segments.iter() {
            s.alloc.check().map_err(|e| format!("segment {}: {e}", s.info.name))?;
            let (want_bytes, want_count) = bytes.remove(&idx).unwrap_or_default();
            if s.alloc.used_bytes() != want_bytes || s.alloc.allocation_count() != want_count {
                return Err(format!(
                    "segment {} reserves {} bytes in {} blocks, replicas account for {want_bytes} in {want_count}",
                    s.info.name,
                    s.alloc.used_bytes(),
                    s.alloc.allocation_count()
                ));
            }
            if self.is_cxl_pool(idx) {
                let healthy = self
                    .cxl
                    .iter()
                    .flat_map(|p| &p.views)
                    .any(|v| self.clients.get(&v.client).is_some_and(|c| !c.suspect));
                if s.suspect == healthy {
                    return Err("the CXL pool's health disagrees with its views".into());
                }
                continue;
            }
            let owner = self.clients.get(&s.owner).ok_or(format!("segment {} has no owner", s.info.name))?;
            if !owner.segments.contains(&idx) || owner.suspect != s.suspect {
                return Err(format!("segment {} disagrees with its owner", s.info.name));
            }
        }
        if !bytes.is_empty() {
            return Err("replicas on missing segments".into());
        }
        for v in self.cxl.iter().flat_map(|p| &p.views) {
            if !self.clients.contains_key(&v.client) {
                return Err(format!("CXL view {} of a client the master does not know", v.info.name));
            }
        }
        for (id, c) in &self.clients {
            if c.segments.iter().any(|&i| self.segments.get(i).map(|s| s.owner) != Some(*id)) {
                return Err(format!("client {id} lists a segment it does not own"));
            }
        }
        Ok(())
    }
}

/// Random operation sequences against a small cluster, checking invariants after every step.
#[test]
fn randomized_model_keeps_invariants() {
    for seed in 0..16u64 {
        // Seeds 12..16 run with a CXL pool: a third of the mounts are views of it (the same area each time).
        let with_cxl = seed >= 12;
        let config = MasterConfig {
            cxl: with_cxl.then(|| crate::types::CxlPoolConfig { path: "dax".into(), size: 256 << 10 }),
            eviction_ratio: 0.1,
            client_ttl_ms: 5_000,
            client_suspect_after_ms: 2_000,
            put_start_discard_timeout_ms: 3_000,
            default_kv_lease_ttl_ms: 500,
            allocation_strategy: [
                crate::types::AllocationStrategy::Random,
                crate::types::AllocationStrategy::FreeRatioFirst,
                crate::types::AllocationStrategy::LocalFirst,
            ][seed as usize % 3],
            ..Default::default()
        };
        let mut h = harness(config);
        let mut rng = Rng::new(seed);
        let mut mounted: Vec<(u128, String)> = Vec::new();
        for step in 0..3_000 {
            let key = format!("key-{}", rng.below(20));
            let client = ClientId(1 + rng.below(4) as u128);
            let len = 1 + rng.below(16_000) as u64;
            let rcfg = ReplicateConfig {
                replica_num: 1 + rng.below(3),
                with_soft_pin: rng.below(5) == 0,
                with_hard_pin: rng.below(20) == 0,
                group_ids: if rng.below(6) == 0 { vec![format!("g{}", rng.below(4))] } else { vec![] },
                prefer_alloc_in_same_node: rng.below(2) == 0,
                ..Default::default()
            };
            let result: Result<()> = match rng.below(100) {
                0..=2 => {
                    let name = format!("seg-{}", rng.below(8));
                    let host = format!("host-{}", client.0 % 2);
                    let mut seg = segment(&name, &host, 128 << 10 << rng.below(3));
                    if with_cxl && rng.below(3) == 0 {
                        (seg.protocol, seg.base, seg.size) = ("cxl".into(), 4096, 256 << 10);
                    }
                    let r = h.core.mount_segment(client, seg);
                    if r.is_ok() {
                        mounted.push((client.0, name));
                    }
                    r
                }
                3 if !mounted.is_empty() => {
                    let (c, name) = mounted.swap_remove(rng.below(mounted.len()));
                    h.core.unmount_segment(ClientId(c), &name).or_else(|e| match e {
                        ErrorCode::SegmentNotFound => Ok(()),
                        e => Err(e),
                    })
                }
                4..=13 => {
                    if h.core.ping(client) == PingOutcome::NeedRemount {
                        mounted.retain(|(c, _)| *c != client.0);
                    }
                    Ok(())
                }
                14 | 15 => h.core.report_unreachable(&format!("seg-{}", rng.below(8))),
                16..=33 => h.core.put_start(client, &key, len, &rcfg).map(drop),
                34..=49 => h.core.put_end(client, &key),
                50..=52 => h.core.put_revoke(client, &key),
                53..=59 => h.core.upsert_start(client, &key, len, &rcfg).map(drop),
                60..=69 => h.core.exist(&key).map(drop),
                70..=77 => h.core.get_replica_list(&key).map(drop),
                78..=81 => h.core.remove(&key, rng.below(4) == 0),
                82 => h.core.remove_by_regex(&format!("key-{}", rng.below(6)), false).map(drop),
                83..=87 => {
                    h.core.batch_put_start(client, &[(key.clone(), len), ("key-x".into(), len)], &rcfg);
                    h.core.batch_put_end(client, &[key.clone(), "key-x".into()]);
                    Ok(())
                }
                _ => {
                    h.advance(rng.below(800) as u64);
                    let report = h.core.tick();
                    mounted.retain(|(c, _)| !report.dropped_clients.contains(&ClientId(*c)));
                    Ok(())
                }
            };
            assert_ne!(result, Err(ErrorCode::Internal), "seed {seed} step {step}");
            if let Err(e) = h.core.check_invariants() {
                panic!("seed {seed} step {step}: {e}");
            }
        }
    }
}
