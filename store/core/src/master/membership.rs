//! Clients and their segments: mount, unmount, ping, unreachability reports, and liveness (suspect after
//! `client_suspect_after_ms` of silence or a report, dropped after `client_ttl_ms`).
//!
//! Suspicion is re-evaluated on ping, mount, report and `tick`, so time-based suspicion has tick granularity.

use super::core::MasterCore;
use super::segments::{ClientState, SegmentState};
use super::views::PingOutcome;
use crate::allocator::{ALIGNMENT, OffsetAllocator};
use crate::types::{ClientId, ErrorCode, Result, Segment};

impl MasterCore {
    /// Adds `client`'s buffer to the pool and marks the client alive. Mounting the same segment again (same
    /// owner, same layout) is a no-op that counts as a ping; the same name with another owner or layout gives
    /// `SegmentAlreadyExists`. Empty names or endpoints, sizes under 8 bytes, or `base + size` overflowing give
    /// `InvalidParams`.
    ///
    /// Size limit: the only one is that the segment fits in the 64-bit address space, i.e. `size <= u64::MAX -
    /// base` (up to 16 EiB with base 0). The offset allocator counts 8-byte units in `u64` with bins up to 2^61
    /// units, and usage totals across segments are summed in `u128`, so every such size is fully usable.
    pub fn mount_segment(&mut self, client: ClientId, segment: Segment) -> Result<()> {
        if segment.name.is_empty()
            || segment.transport_endpoint.is_empty()
            || segment.size < ALIGNMENT
            || segment.base.checked_add(segment.size).is_none()
        {
            return Err(ErrorCode::InvalidParams);
        }
        if segment.protocol == "cxl" {
            return self.mount_cxl_view(client, segment);
        }
        if self.cxl.as_ref().is_some_and(|p| p.views.iter().any(|v| v.info.name == segment.name)) {
            return Err(ErrorCode::SegmentAlreadyExists);
        }
        if let Some(idx) = self.segments.find(&segment.name) {
            let same = self.segments.get(idx).is_some_and(|s| s.owner == client && s.info == segment);
            if !same {
                return Err(ErrorCode::SegmentAlreadyExists);
            }
            self.mark_alive(client);
            return Ok(());
        }
        let host = segment.host.clone();
        let idx = self.segments.insert(SegmentState {
            alloc: OffsetAllocator::new(segment.size),
            info: segment,
            owner: client,
            suspect: false,
        });
        let now = self.now();
        let state = self.clients.entry(client).or_insert_with(|| ClientState {
            last_seen: now,
            reported_unreachable: false,
            suspect: false,
            host: None,
            segments: Vec::new(),
        });
        state.host = Some(host);
        state.segments.push(idx);
        self.mark_alive(client);
        Ok(())
    }

    /// Removes one of `client`'s segments and every replica on it (objects left without replicas disappear).
    /// `SegmentNotFound` when no segment of that name belongs to the client.
    pub fn unmount_segment(&mut self, client: ClientId, name: &str) -> Result<()> {
        if self.unmount_cxl_view(client, name) {
            return Ok(());
        }
        let idx = self.segments.find(name).ok_or(ErrorCode::SegmentNotFound)?;
        if self.segments.get(idx).map(|s| s.owner) != Some(client) {
            return Err(ErrorCode::SegmentNotFound);
        }
        self.purge_segments(&[idx]);
        if let Some(state) = self.clients.get_mut(&client) {
            state.segments.retain(|&s| s != idx);
        }
        Ok(())
    }

    /// Records that `client` is alive (and no longer suspect). A client the master does not know, e.g. after a
    /// master restart or after it was dropped for silence, gets `NeedRemount`; mounting makes it known.
    pub fn ping(&mut self, client: ClientId) -> PingOutcome {
        if self.clients.contains_key(&client) {
            self.mark_alive(client);
            PingOutcome::Ok
        } else {
            PingOutcome::NeedRemount
        }
    }

    /// A transfer to `target` (a segment name or a transport endpoint) failed: every client owning a matching
    /// segment becomes suspect until it pings again. `SegmentNotFound` when nothing matches.
    pub fn report_unreachable(&mut self, target: &str) -> Result<()> {
        let mut owners: Vec<ClientId> = self
            .segments
            .iter()
            .filter(|&(i, s)| !self.is_cxl_pool(i) && (s.info.name == target || s.info.transport_endpoint == target))
            .map(|(_, s)| s.owner)
            .chain(self.cxl_view_owners(target))
            .collect();
        if owners.is_empty() {
            return Err(ErrorCode::SegmentNotFound);
        }
        owners.sort_unstable();
        owners.dedup();
        for owner in owners {
            if let Some(state) = self.clients.get_mut(&owner) {
                state.reported_unreachable = true;
            }
            self.set_suspect(owner, true);
        }
        Ok(())
    }

    /// Drops clients silent for `client_ttl_ms` (with their segments and replicas) and updates suspicion of the
    /// rest. Returns the dropped clients, sorted.
    pub(crate) fn expire_clients(&mut self, now: u64) -> Vec<ClientId> {
        let mut dropped = Vec::new();
        let mut changed = Vec::new();
        for (&id, c) in &self.clients {
            let silent = now.saturating_sub(c.last_seen);
            if silent >= self.config.client_ttl_ms {
                dropped.push(id);
            } else {
                let suspect = c.reported_unreachable || silent >= self.config.client_suspect_after_ms;
                if suspect != c.suspect {
                    changed.push((id, suspect));
                }
            }
        }
        for (id, suspect) in changed {
            self.set_suspect(id, suspect);
        }
        dropped.sort_unstable();
        let mut doomed = Vec::new();
        for id in &dropped {
            if let Some(state) = self.clients.remove(id) {
                tracing::info!(client = %id, segments = state.segments.len(), "client expired");
                doomed.extend(state.segments);
            }
        }
        if !doomed.is_empty() {
            self.purge_segments(&doomed);
        }
        if !dropped.is_empty() {
            self.drop_cxl_views(&dropped);
        }
        dropped
    }

    /// Removes segments and every replica on them. Objects left without replicas are removed; an upsert left
    /// without new replicas is abandoned.
    pub(crate) fn purge_segments(&mut self, doomed: &[u32]) {
        let mut is_doomed = vec![false; self.segments.slot_bound()];
        for &idx in doomed {
            if let Some(flag) = is_doomed.get_mut(idx as usize) {
                *flag = true;
            }
        }
        let gone = |segment: u32| is_doomed.get(segment as usize).copied().unwrap_or(false);
        for i in (0..self.objects.len()).rev() {
            let Some(o) = self.objects.get_mut(i) else { continue };
            o.replicas.retain(|r| !gone(r.segment));
            let abandoned = match &mut o.upsert {
                Some(up) => {
                    up.replicas.retain(|r| !gone(r.segment));
                    up.replicas.is_empty()
                }
                None => false,
            };
            if abandoned {
                if let Some(up) = o.upsert.take() {
                    self.groups.release(&up.protection.groups);
                }
            }
            if self.objects.get(i).is_some_and(|o| o.replicas.is_empty()) {
                self.remove_object(i);
            }
        }
        for copy in self.copies.values_mut() {
            copy.replicas.retain(|r| !gone(r.segment));
        }
        self.deferred.retain(|d| !gone(d.segment));
        for &idx in doomed {
            if let Some(s) = self.segments.remove(idx) {
                tracing::info!(segment = %s.info.name, "segment unmounted");
            }
        }
    }

    pub(crate) fn mark_alive(&mut self, client: ClientId) {
        let now = self.now();
        if let Some(state) = self.clients.get_mut(&client) {
            state.last_seen = now;
            state.reported_unreachable = false;
        }
        self.set_suspect(client, false);
    }

    fn set_suspect(&mut self, client: ClientId, suspect: bool) {
        let Some(state) = self.clients.get_mut(&client) else { return };
        state.suspect = suspect;
        for &idx in &state.segments {
            if let Some(s) = self.segments.get_mut(idx) {
                s.suspect = suspect;
            }
        }
        self.refresh_cxl_pool();
    }
}

#[cfg(test)]
mod tests {
    use crate::master::testing::{cfg, harness, segment};
    use crate::master::{ManualClock, MasterCore, PingOutcome};
    use crate::types::{ClientId, ErrorCode, MasterConfig, ReplicateConfig};

    const MIB: u64 = 1 << 20;

    #[test]
    fn mount_is_idempotent_and_names_are_unique() {
        let mut h = harness(MasterConfig::default());
        h.mount(1, "a", "h1", MIB);
        h.mount(1, "a", "h1", MIB);
        let c = &mut h.core;
        assert_eq!(c.mount_segment(ClientId(2), segment("a", "h1", MIB)), Err(ErrorCode::SegmentAlreadyExists));
        assert_eq!(c.mount_segment(ClientId(1), segment("a", "h1", 2 * MIB)), Err(ErrorCode::SegmentAlreadyExists));
        assert_eq!(c.stats().mounted_segments, 1);
        h.check();
    }

    #[test]
    fn mount_rejects_bad_segments() {
        let mut h = harness(MasterConfig::default());
        let bad = [
            segment("", "h", MIB),
            segment("a", "h", 0),
            segment("a", "h", 7),
            crate::types::Segment { transport_endpoint: String::new(), ..segment("a", "h", MIB) },
            crate::types::Segment { base: u64::MAX - 10, ..segment("a", "h", MIB) },
        ];
        for s in bad {
            assert_eq!(h.core.mount_segment(ClientId(1), s), Err(ErrorCode::InvalidParams));
        }
        assert_eq!(h.core.stats().mounted_segments, 0);
    }

    /// Segments from 16 TiB up to the whole 64-bit address space place 4 KiB objects (single and batched, with
    /// every strategy), can hold one object of (nearly) their full size, and one byte more than fits in the
    /// address space is rejected.
    #[test]
    fn huge_segments_up_to_the_address_space_limit() {
        use crate::types::{AllocationStrategy, Segment};
        let base = 1u64 << 40;
        let sizes = [1u64 << 44, 1 << 50, 1 << 60, 1 << 63, u64::MAX - base];
        let strategies =
            [AllocationStrategy::Random, AllocationStrategy::FreeRatioFirst, AllocationStrategy::LocalFirst];
        for strategy in strategies {
            for size in sizes {
                let mut h = harness(MasterConfig { allocation_strategy: strategy, ..Default::default() });
                let c = ClientId(1);
                h.core.mount_segment(c, Segment { base, ..segment("a", "h", size) }).unwrap();
                let r = h.core.put_start(c, "one", 4096, &cfg(1)).unwrap();
                assert_eq!((r[0].addr, r[0].len), (base, 4096), "size {size}");
                let items: Vec<(String, u64)> = (0..256).map(|i| (format!("k{i}"), 4096)).collect();
                for (i, r) in h.core.batch_put_start(c, &items, &cfg(1)).into_iter().enumerate() {
                    let r = r.unwrap_or_else(|e| panic!("size {size} {strategy:?} key {i}: {e:?}"));
                    assert!(r[0].addr >= base && r[0].addr - base + 4096 <= size);
                }
                let keys: Vec<&str> = items.iter().map(|(k, _)| k.as_str()).collect();
                assert!(h.core.batch_put_end(c, &keys).iter().all(Result::is_ok));
                assert_eq!(h.core.tick().evicted_objects, 0, "far below the watermark");
                let s = h.core.stats();
                assert_eq!((s.key_count, s.allocated_bytes, s.total_capacity_bytes), (257, 257 * 4096, size));
                // Whatever is left is one block: an object of exactly the free space fits.
                let rest = (size & !7) - 257 * 4096;
                let r = h.core.put_start(c, "rest", rest, &cfg(1)).unwrap();
                assert_eq!(r[0].addr + rest, base + (size & !7));
                assert_eq!(h.core.put_start(c, "more", 8, &cfg(1)), Err(ErrorCode::NoAvailableHandle));
                h.check();
            }
        }
        // The largest segment of all: base 0, every byte of the address space but the last.
        let mut h = harness(MasterConfig::default());
        h.core.mount_segment(ClientId(1), Segment { base: 0, ..segment("all", "h", u64::MAX) }).unwrap();
        let r = h.core.put_start(ClientId(1), "all", u64::MAX - 7, &cfg(1)).unwrap();
        assert_eq!((r[0].addr, r[0].len), (0, u64::MAX - 7));
        h.check();
        // One byte past the address space is the limit.
        for s in [
            Segment { base, ..segment("b", "h", u64::MAX - base + 1) },
            Segment { base: 1, ..segment("b", "h", u64::MAX) },
        ] {
            assert_eq!(h.core.mount_segment(ClientId(2), s), Err(ErrorCode::InvalidParams));
        }
    }

    #[test]
    fn unknown_client_needs_remount_also_after_restart() {
        let mut h = harness(MasterConfig::default());
        assert_eq!(h.core.ping(ClientId(1)), PingOutcome::NeedRemount);
        h.mount(1, "a", "h1", MIB);
        assert_eq!(h.core.ping(ClientId(1)), PingOutcome::Ok);
        // A restarted master is a fresh core: it knows nobody until they mount again.
        let mut restarted = MasterCore::new(MasterConfig::default(), Box::new(ManualClock::new(0)), 1).unwrap();
        assert_eq!(restarted.ping(ClientId(1)), PingOutcome::NeedRemount);
        restarted.mount_segment(ClientId(1), segment("a", "h1", MIB)).unwrap();
        assert_eq!(restarted.ping(ClientId(1)), PingOutcome::Ok);
    }

    #[test]
    fn silent_client_is_dropped_with_its_replicas() {
        let mut h = harness(MasterConfig::default());
        h.mount(1, "a", "h1", MIB);
        h.mount(2, "b", "h2", MIB);
        let on = |s: &str| ReplicateConfig { preferred_segments: vec![s.into()], ..cfg(1) };
        h.put_with("on-a", 100, &on("a")).unwrap();
        h.put_with("on-b", 100, &on("b")).unwrap();
        h.put_with("both", 100, &cfg(2)).unwrap();
        for _ in 0..10 {
            h.advance(1_000);
            assert_eq!(h.core.ping(ClientId(2)), PingOutcome::Ok);
            let report = h.core.tick();
            assert!(report.dropped_clients.is_empty() || report.dropped_clients == vec![ClientId(1)]);
        }
        assert!(!h.has("on-a"));
        assert!(h.has("on-b"));
        let (replicas, _) = h.core.get_replica_list("both").unwrap();
        assert_eq!(replicas.len(), 1);
        assert_eq!(replicas[0].segment, "b");
        assert_eq!(h.core.stats().active_clients, 1);
        assert_eq!(h.core.ping(ClientId(1)), PingOutcome::NeedRemount);
        h.check();
    }

    #[test]
    fn client_silent_past_suspect_threshold_is_excluded_until_it_pings() {
        let mut h = harness(MasterConfig::default());
        h.mount(1, "a", "h1", MIB);
        h.mount(2, "b", "h2", MIB);
        let on_a = ReplicateConfig { preferred_segments: vec!["a".into()], ..cfg(1) };
        h.put_with("k", 100, &on_a).unwrap();
        h.advance(3_000);
        h.core.ping(ClientId(2));
        h.core.tick();
        assert_eq!(h.core.stats().suspect_segments, 1);
        // Reads hide replicas on the suspect segment; the object is not readable right now.
        assert_eq!(h.core.exist("k"), Ok(false));
        assert_eq!(h.core.get_replica_list("k"), Err(ErrorCode::UnavailableInCurrentStatus));
        // No new placements there, even when preferred.
        for i in 0..20 {
            let r = h.core.put_start(ClientId(2), &format!("n{i}"), 10, &on_a).unwrap();
            assert_eq!(r[0].segment, "b");
        }
        assert_eq!(h.core.ping(ClientId(1)), PingOutcome::Ok);
        assert_eq!(h.core.exist("k"), Ok(true));
        assert_eq!(h.core.stats().suspect_segments, 0);
        h.check();
    }

    #[test]
    fn reported_unreachable_peer_is_suspect_until_it_pings() {
        let mut h = harness(MasterConfig::default());
        h.mount(1, "a", "h1", MIB);
        h.mount(2, "b", "h2", MIB);
        h.put_with("k", 100, &ReplicateConfig { preferred_segments: vec!["a".into()], ..cfg(1) }).unwrap();
        assert_eq!(h.core.report_unreachable("nobody"), Err(ErrorCode::SegmentNotFound));
        h.core.report_unreachable("a@ep").unwrap();
        assert_eq!(h.core.get_replica_list("k"), Err(ErrorCode::UnavailableInCurrentStatus));
        // A tick does not clear a report; only a ping does.
        h.core.tick();
        assert_eq!(h.core.exist("k"), Ok(false));
        h.core.ping(ClientId(1));
        assert_eq!(h.core.exist("k"), Ok(true));
        h.core.report_unreachable("a").unwrap();
        assert_eq!(h.core.exist("k"), Ok(false));
        h.check();
    }

    #[test]
    fn unmount_drops_replicas_and_checks_the_owner() {
        let mut h = harness(MasterConfig::default());
        h.mount(1, "a", "h1", MIB);
        h.mount(1, "b", "h1", MIB);
        h.put_with("k", 100, &cfg(2)).unwrap();
        assert_eq!(h.core.unmount_segment(ClientId(2), "a"), Err(ErrorCode::SegmentNotFound));
        assert_eq!(h.core.unmount_segment(ClientId(1), "zz"), Err(ErrorCode::SegmentNotFound));
        h.core.unmount_segment(ClientId(1), "a").unwrap();
        assert_eq!(h.core.get_replica_list("k").unwrap().0.len(), 1);
        h.check();
        h.core.unmount_segment(ClientId(1), "b").unwrap();
        assert!(!h.has("k"));
        assert_eq!(h.core.ping(ClientId(1)), PingOutcome::Ok, "a client stays known without segments");
        h.check();
    }
}
