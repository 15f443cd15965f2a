//! Writes: put (put-if-absent) and upsert, each in two phases. `put_start` / `upsert_start` reserve replicas
//! (status `Processing`) for the client to write into; `put_end` makes them readable; `put_revoke` gives them
//! back.
//!
//! - `put_start` on an existing key fails with `ObjectAlreadyExists`, except when the existing object is a
//!   zombie: a put still unfinished after `put_start_discard_timeout_ms`, which is reclaimed and replaced.
//! - `upsert_start` on a missing key is a put. On a complete object it reserves *fresh* replicas (never the
//!   bytes readers may be reading); readers keep getting the old replicas until `put_end` swaps them in. The
//!   old allocations are freed then, or when the readers' lease runs out if one is active. On an object whose
//!   put or upsert is still in flight it fails with `ReplicaNotReady` (unless that write is a zombie).
//! - `put_end` completes whichever write (put or upsert) is in flight, and is a no-op on a complete object.
//!   `put_revoke` likewise abandons whichever write is in flight; revoking a complete object with nothing in
//!   flight is `InvalidWrite`.
//! - Writes are not tied to the client that started them: any client may end or revoke them.
//! - Batch forms return one result per key, in order, and run at most one eviction pass per batch.

use super::core::MasterCore;
use super::key::CompactKey;
use super::objects::{Object, ObjectState, PendingUpsert, Protection, Replicas};
use crate::types::{ClientId, ErrorCode, ReplicaDescriptor, ReplicaStatus, ReplicateConfig, Result};

/// Pin settings of a valid write request.
struct Pins {
    hard_pin: bool,
    soft_pin_ttl: u64,
}

impl MasterCore {
    /// Reserves `cfg.replica_num` replicas of `value_len` bytes for a new object `key` (see the module and
    /// `placement` docs). Empty key: `InvalidKey`; zero length or replicas, or a zero soft pin ttl:
    /// `InvalidParams`; existing key: `ObjectAlreadyExists`; no space even after eviction: `NoAvailableHandle`.
    pub fn put_start(
        &mut self,
        client: ClientId,
        key: &str,
        value_len: u64,
        cfg: &ReplicateConfig,
    ) -> Result<Vec<ReplicaDescriptor>> {
        self.put_start_once(client, key, value_len, cfg, &mut true)
    }

    /// [`MasterCore::put_start`] for many `(key, value_len)` pairs with one config.
    pub fn batch_put_start<S: AsRef<str>>(
        &mut self,
        client: ClientId,
        items: &[(S, u64)],
        cfg: &ReplicateConfig,
    ) -> Vec<Result<Vec<ReplicaDescriptor>>> {
        let mut may_evict = true;
        items.iter().map(|(key, len)| self.put_start_once(client, key.as_ref(), *len, cfg, &mut may_evict)).collect()
    }

    /// Completes the write in flight on `key`: its replicas become readable. `ObjectNotFound` if no such key.
    pub fn put_end(&mut self, _client: ClientId, key: &str) -> Result<()> {
        let idx = self.find(key)?;
        let now = self.now();
        let epoch = self.eviction_epoch;
        let o = self.objects.get_mut(idx).ok_or(ErrorCode::Internal)?;
        if let Some(up) = o.upsert.take() {
            let PendingUpsert { replicas, size, protection, .. } = *up;
            let old_replicas = std::mem::replace(&mut o.replicas, replicas);
            let old_groups = std::mem::replace(&mut o.groups, protection.groups);
            o.size = size;
            o.hard_pin = protection.hard_pin;
            o.soft_pin_ttl = protection.soft_pin_ttl;
            o.admit(now, epoch);
            let lease_until = o.read_until;
            self.groups.release(&old_groups);
            self.release_replicas(old_replicas, lease_until);
        } else if o.state == ObjectState::Processing {
            o.admit(now, epoch);
        }
        Ok(())
    }

    /// [`MasterCore::put_end`] for many keys.
    pub fn batch_put_end<S: AsRef<str>>(&mut self, client: ClientId, keys: &[S]) -> Vec<Result<()>> {
        keys.iter().map(|k| self.put_end(client, k.as_ref())).collect()
    }

    /// Abandons the write in flight on `key` and frees its replicas: an unfinished put removes the object, an
    /// unfinished upsert leaves the old value in place. `InvalidWrite` when nothing is in flight.
    pub fn put_revoke(&mut self, _client: ClientId, key: &str) -> Result<()> {
        let idx = self.find(key)?;
        let o = self.objects.get_mut(idx).ok_or(ErrorCode::Internal)?;
        if let Some(up) = o.upsert.take() {
            self.groups.release(&up.protection.groups);
            self.release_replicas(up.replicas, 0);
            Ok(())
        } else if o.state == ObjectState::Processing {
            self.remove_object(idx);
            Ok(())
        } else {
            Err(ErrorCode::InvalidWrite)
        }
    }

    /// [`MasterCore::put_revoke`] for many keys.
    pub fn batch_put_revoke<S: AsRef<str>>(&mut self, client: ClientId, keys: &[S]) -> Vec<Result<()>> {
        keys.iter().map(|k| self.put_revoke(client, k.as_ref())).collect()
    }

    /// Puts `key`, or, if it exists and is complete, reserves fresh replicas that replace the old ones at
    /// `put_end` (see the module docs). `ReplicaNotReady` while another write on `key` is in flight.
    pub fn upsert_start(
        &mut self,
        client: ClientId,
        key: &str,
        value_len: u64,
        cfg: &ReplicateConfig,
    ) -> Result<Vec<ReplicaDescriptor>> {
        self.upsert_start_once(client, key, value_len, cfg, &mut true)
    }

    /// [`MasterCore::upsert_start`] for many `(key, value_len)` pairs with one config.
    pub fn batch_upsert_start<S: AsRef<str>>(
        &mut self,
        client: ClientId,
        items: &[(S, u64)],
        cfg: &ReplicateConfig,
    ) -> Vec<Result<Vec<ReplicaDescriptor>>> {
        let mut may_evict = true;
        items.iter().map(|(key, len)| self.upsert_start_once(client, key.as_ref(), *len, cfg, &mut may_evict)).collect()
    }

    fn validate_write(&self, key: &str, len: u64, cfg: &ReplicateConfig) -> Result<Pins> {
        if key.is_empty() {
            return Err(ErrorCode::InvalidKey);
        }
        if len == 0 || cfg.replica_num == 0 || (cfg.with_soft_pin && cfg.soft_pin_ttl_ms == Some(0)) {
            return Err(ErrorCode::InvalidParams);
        }
        let soft_pin_ttl = if cfg.with_soft_pin {
            cfg.soft_pin_ttl_ms
                .unwrap_or(self.config.default_kv_soft_pin_ttl_ms)
                .min(self.config.max_kv_soft_pin_ttl_ms)
        } else {
            0
        };
        Ok(Pins { hard_pin: cfg.with_hard_pin, soft_pin_ttl })
    }

    fn is_zombie(&self, started: u64, now: u64) -> bool {
        now.saturating_sub(started) >= self.config.put_start_discard_timeout_ms
    }

    fn put_start_once(
        &mut self,
        client: ClientId,
        key: &str,
        len: u64,
        cfg: &ReplicateConfig,
        may_evict: &mut bool,
    ) -> Result<Vec<ReplicaDescriptor>> {
        let pins = self.validate_write(key, len, cfg)?;
        let now = self.now();
        if let Some(idx) = self.objects.find(key) {
            let zombie = self
                .objects
                .get(idx)
                .is_some_and(|o| o.state == ObjectState::Processing && self.is_zombie(o.last_access, now));
            if !zombie {
                return Err(ErrorCode::ObjectAlreadyExists);
            }
            tracing::info!(key, "reclaiming an abandoned put");
            self.remove_object(idx);
        }
        let replicas = self.place_replicas(client, len, cfg, may_evict)?;
        let descriptors = self.descriptors(&replicas);
        let groups = self.groups.acquire(&cfg.group_ids);
        self.objects.insert(Object {
            key: CompactKey::new(key),
            size: len,
            replicas,
            state: ObjectState::Processing,
            lease_until: 0,
            read_until: 0,
            last_access: now,
            soft_pin_until: 0,
            soft_pin_ttl: pins.soft_pin_ttl,
            groups,
            admitted_epoch: 0,
            hard_pin: pins.hard_pin,
            upsert: None,
        });
        self.watch_for_zombie(now);
        Ok(descriptors)
    }

    fn upsert_start_once(
        &mut self,
        client: ClientId,
        key: &str,
        len: u64,
        cfg: &ReplicateConfig,
        may_evict: &mut bool,
    ) -> Result<Vec<ReplicaDescriptor>> {
        let pins = self.validate_write(key, len, cfg)?;
        let now = self.now();
        let Some(idx) = self.objects.find(key) else {
            return self.put_start_once(client, key, len, cfg, may_evict);
        };
        let o = self.objects.get(idx).ok_or(ErrorCode::Internal)?;
        if o.state == ObjectState::Processing {
            return self.put_start_once(client, key, len, cfg, may_evict).map_err(|e| match e {
                ErrorCode::ObjectAlreadyExists => ErrorCode::ReplicaNotReady,
                e => e,
            });
        }
        if let Some(up) = &o.upsert {
            if !self.is_zombie(up.started, now) {
                return Err(ErrorCode::ReplicaNotReady);
            }
            tracing::info!(key, "reclaiming an abandoned upsert");
            self.put_revoke(client, key)?;
        }
        // Mark the write in flight before placing, so an eviction pass run by placement skips this object.
        let pending = PendingUpsert {
            replicas: Replicas::new(),
            size: len,
            started: now,
            protection: Protection { hard_pin: pins.hard_pin, soft_pin_ttl: pins.soft_pin_ttl, groups: None },
        };
        self.objects.get_mut(idx).ok_or(ErrorCode::Internal)?.upsert = Some(Box::new(pending));
        let placed = self.place_replicas(client, len, cfg, may_evict);
        let idx = self.objects.find(key).ok_or(ErrorCode::Internal)?;
        let replicas = match placed {
            Ok(replicas) => replicas,
            Err(e) => {
                if let Some(o) = self.objects.get_mut(idx) {
                    o.upsert = None;
                }
                return Err(e);
            }
        };
        let descriptors = self.descriptors(&replicas);
        let groups = self.groups.acquire(&cfg.group_ids);
        if let Some(up) = self.objects.get_mut(idx).and_then(|o| o.upsert.as_mut()) {
            up.replicas = replicas;
            up.protection.groups = groups;
        }
        self.watch_for_zombie(now);
        Ok(descriptors)
    }

    fn descriptors(&self, replicas: &Replicas) -> Vec<ReplicaDescriptor> {
        replicas.iter().filter_map(|r| self.descriptor(r, ReplicaStatus::Processing)).collect()
    }

    fn watch_for_zombie(&mut self, started: u64) {
        let deadline = started.saturating_add(self.config.put_start_discard_timeout_ms);
        self.next_zombie_check = self.next_zombie_check.min(deadline);
    }

    /// Reclaims writes unfinished after `put_start_discard_timeout_ms`. Scans the objects only when the oldest
    /// write in flight (as of the last scan) can have timed out, so idle ticks cost nothing.
    pub(crate) fn reclaim_zombies(&mut self, now: u64) -> u64 {
        if now < self.next_zombie_check {
            return 0;
        }
        let timeout = self.config.put_start_discard_timeout_ms;
        let mut next = u64::MAX;
        let mut reclaimed = 0;
        for i in (0..self.objects.len()).rev() {
            let Some(o) = self.objects.get_mut(i) else { continue };
            if o.state == ObjectState::Processing {
                if o.last_access.saturating_add(timeout) <= now {
                    self.remove_object(i);
                    reclaimed += 1;
                } else {
                    next = next.min(o.last_access.saturating_add(timeout));
                }
            } else if let Some(started) = o.upsert.as_ref().map(|up| up.started) {
                if started.saturating_add(timeout) <= now {
                    if let Some(up) = o.upsert.take() {
                        self.groups.release(&up.protection.groups);
                        self.release_replicas(up.replicas, 0);
                    }
                    reclaimed += 1;
                } else {
                    next = next.min(started.saturating_add(timeout));
                }
            }
        }
        self.next_zombie_check = next;
        if reclaimed > 0 {
            tracing::info!(reclaimed, "reclaimed abandoned writes");
        }
        reclaimed
    }
}

#[cfg(test)]
mod tests {
    use crate::master::testing::{cfg, harness, quiet};
    use crate::types::{ClientId, ErrorCode, ReplicaStatus, ReplicateConfig};

    const MIB: u64 = 1 << 20;
    const C: ClientId = ClientId(1);

    #[test]
    fn put_is_invisible_until_put_end() {
        let mut h = harness(quiet());
        h.mount(1, "a", "h", MIB);
        let r = h.core.put_start(C, "k", 4096, &cfg(1)).unwrap();
        assert_eq!(r[0].status, ReplicaStatus::Processing);
        assert_eq!(r[0].len, 4096);
        assert_eq!(h.core.exist("k"), Err(ErrorCode::ReplicaNotReady));
        assert_eq!(h.core.get_replica_list("k"), Err(ErrorCode::ReplicaNotReady));
        assert_eq!(h.core.get_size("k"), Err(ErrorCode::ReplicaNotReady));
        h.core.put_end(C, "k").unwrap();
        h.core.put_end(C, "k").unwrap(); // idempotent
        let (got, lease) = h.core.get_replica_list("k").unwrap();
        assert_eq!(got[0].status, ReplicaStatus::Complete);
        assert_eq!((got[0].addr, lease), (r[0].addr, 10_000));
        assert_eq!(h.core.get_size("k"), Ok(4096));
        h.check();
    }

    #[test]
    fn put_is_put_if_absent() {
        let mut h = harness(quiet());
        h.mount(1, "a", "h", MIB);
        h.core.put_start(C, "k", 10, &cfg(1)).unwrap();
        assert_eq!(h.core.put_start(C, "k", 10, &cfg(1)), Err(ErrorCode::ObjectAlreadyExists));
        h.core.put_end(C, "k").unwrap();
        assert_eq!(h.core.put_start(ClientId(2), "k", 10, &cfg(1)), Err(ErrorCode::ObjectAlreadyExists));
    }

    #[test]
    fn bad_writes_get_typed_errors() {
        let mut h = harness(quiet());
        h.mount(1, "a", "h", MIB);
        assert_eq!(h.core.put_start(C, "", 10, &cfg(1)), Err(ErrorCode::InvalidKey));
        assert_eq!(h.core.put_start(C, "k", 0, &cfg(1)), Err(ErrorCode::InvalidParams));
        assert_eq!(h.core.put_start(C, "k", 10, &cfg(0)), Err(ErrorCode::InvalidParams));
        let zero_pin = ReplicateConfig { with_soft_pin: true, soft_pin_ttl_ms: Some(0), ..cfg(1) };
        assert_eq!(h.core.put_start(C, "k", 10, &zero_pin), Err(ErrorCode::InvalidParams));
        assert_eq!(h.core.upsert_start(C, "", 10, &cfg(1)), Err(ErrorCode::InvalidKey));
        assert_eq!(h.core.put_end(C, "nope"), Err(ErrorCode::ObjectNotFound));
        assert_eq!(h.core.put_end(C, ""), Err(ErrorCode::InvalidKey));
        assert_eq!(h.core.put_revoke(C, "nope"), Err(ErrorCode::ObjectNotFound));
        h.put("done", 10).unwrap();
        assert_eq!(h.core.put_revoke(C, "done"), Err(ErrorCode::InvalidWrite));
        assert_eq!(h.core.stats().key_count, 1);
        h.check();
    }

    #[test]
    fn revoke_frees_the_reservation() {
        let mut h = harness(quiet());
        h.mount(1, "a", "h", MIB);
        h.core.put_start(C, "k", 1000, &cfg(1)).unwrap();
        assert_eq!(h.core.stats().allocated_bytes, 1000);
        h.core.put_revoke(C, "k").unwrap();
        assert_eq!(h.core.stats().allocated_bytes, 0);
        assert!(!h.has("k"));
        h.check();
    }

    #[test]
    fn zombie_puts_are_reclaimed_by_tick_and_by_a_new_put() {
        let mut h = harness(quiet());
        h.mount(1, "a", "h", MIB);
        h.core.put_start(C, "k", 1000, &cfg(1)).unwrap();
        h.core.put_start(C, "z", 1000, &cfg(1)).unwrap();
        h.advance(29_999);
        assert_eq!(h.core.tick().reclaimed_writes, 0);
        assert_eq!(h.core.put_start(C, "k", 10, &cfg(1)), Err(ErrorCode::ObjectAlreadyExists));
        h.advance(1);
        // A new put of the same key reclaims the abandoned one at once.
        h.core.put_start(C, "k", 10, &cfg(1)).unwrap();
        assert_eq!(h.core.tick().reclaimed_writes, 1);
        assert!(!h.has("z"));
        assert_eq!(h.core.stats().allocated_bytes, 16);
        h.check();
    }

    #[test]
    fn batches_return_one_result_per_key() {
        let mut h = harness(quiet());
        h.mount(1, "a", "h", MIB);
        let items = [("a", 10u64), ("", 10), ("a", 10), ("b", 0), ("c", 2 * MIB), ("d", 10)];
        let got: Vec<_> = h.core.batch_put_start(C, &items, &cfg(1)).into_iter().map(|r| r.map(|v| v.len())).collect();
        assert_eq!(
            got,
            [
                Ok(1),
                Err(ErrorCode::InvalidKey),
                Err(ErrorCode::ObjectAlreadyExists),
                Err(ErrorCode::InvalidParams),
                Err(ErrorCode::NoAvailableHandle),
                Ok(1)
            ]
        );
        assert_eq!(h.core.batch_put_end(C, &["a", "zz"]), [Ok(()), Err(ErrorCode::ObjectNotFound)]);
        assert_eq!(h.core.batch_put_revoke(C, &["d", "a"]), [Ok(()), Err(ErrorCode::InvalidWrite)]);
        assert_eq!(h.core.batch_exist(&["a", "d", ""]), [Ok(true), Ok(false), Err(ErrorCode::InvalidKey)]);
        let lists = h.core.batch_get_replica_list(&["a", "d"]);
        assert!(lists[0].is_ok() && lists[1] == Err(ErrorCode::ObjectNotFound));
        h.advance(10_000);
        assert_eq!(h.core.batch_remove(&["a", "a"], false), [Ok(()), Err(ErrorCode::ObjectNotFound)]);
        h.check();
    }

    #[test]
    fn upsert_writes_fresh_replicas_and_defers_freeing_leased_ones() {
        let mut h = harness(quiet());
        h.mount(1, "a", "h", MIB);
        // Upsert of a missing key is a put.
        let first = h.core.upsert_start(C, "k", 1000, &cfg(1)).unwrap();
        assert_eq!(h.core.upsert_start(C, "k", 1000, &cfg(1)), Err(ErrorCode::ReplicaNotReady));
        h.core.put_end(C, "k").unwrap();
        let (old, _) = h.core.get_replica_list("k").unwrap(); // a reader holds a lease now
        assert_eq!(old[0].addr, first[0].addr);
        let new = h.core.upsert_start(C, "k", 2000, &cfg(1)).unwrap();
        assert_ne!(new[0].addr, old[0].addr);
        assert_eq!(h.core.upsert_start(C, "k", 10, &cfg(1)), Err(ErrorCode::ReplicaNotReady));
        // Readers still get the old bytes until put_end.
        assert_eq!(h.core.get_replica_list("k").unwrap().0, old);
        h.advance(1_000);
        h.core.put_end(C, "k").unwrap();
        let (now_served, _) = h.core.get_replica_list("k").unwrap();
        assert_eq!((now_served[0].addr, now_served[0].len), (new[0].addr, 2000));
        // The old allocation stays reserved while the lease it was read under lasts.
        assert_eq!(h.core.stats().allocated_bytes, 3000);
        h.check();
        h.advance(8_999);
        assert_eq!(h.core.tick().released_allocations, 0);
        h.advance(1);
        assert_eq!(h.core.tick().released_allocations, 1);
        assert_eq!(h.core.stats().allocated_bytes, 2000);
        h.check();
    }

    #[test]
    fn upsert_without_lease_frees_at_once_and_revoke_keeps_old_value() {
        let mut h = harness(quiet());
        h.mount(1, "a", "h", MIB);
        h.put("k", 1000).unwrap();
        h.core.upsert_start(C, "k", 500, &cfg(1)).unwrap();
        h.core.put_revoke(C, "k").unwrap();
        assert_eq!(h.core.get_size("k"), Ok(1000));
        assert_eq!(h.core.put_revoke(C, "k"), Err(ErrorCode::InvalidWrite));
        let pinned = ReplicateConfig { with_hard_pin: true, group_ids: vec!["g".into()], ..cfg(1) };
        h.core.upsert_start(C, "k", 500, &pinned).unwrap();
        h.core.put_end(C, "k").unwrap();
        assert_eq!(h.core.stats().allocated_bytes, 504);
        let info = h.core.query_key("k").unwrap();
        assert!(info.hard_pinned && info.group_ids == ["g"]);
        h.check();
    }

    #[test]
    fn zombie_upserts_are_reclaimed() {
        let mut h = harness(quiet());
        h.mount(1, "a", "h", MIB);
        h.put("k", 1000).unwrap();
        h.core.upsert_start(C, "k", 500, &cfg(1)).unwrap();
        h.advance(30_000);
        assert_eq!(h.core.tick().reclaimed_writes, 1);
        assert_eq!(h.core.get_size("k"), Ok(1000));
        assert_eq!(h.core.stats().allocated_bytes, 1000);
        // And a new upsert replaces a zombie one directly.
        h.core.upsert_start(C, "k", 500, &cfg(1)).unwrap();
        h.advance(30_000);
        h.core.upsert_start(C, "k", 700, &cfg(1)).unwrap();
        h.core.put_end(C, "k").unwrap();
        assert_eq!(h.core.get_size("k"), Ok(700));
        h.check();
    }
}
