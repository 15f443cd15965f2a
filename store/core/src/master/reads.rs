//! Reads: `exist`, `get_replica_list`, `get_size`. A successful read grants the object a lease of
//! `default_kv_lease_ttl_ms` (which blocks removal without force and eviction), extends its soft pin, and marks
//! it recently used. Only `get_replica_list`, which hands out replica addresses, also keeps replaced or removed
//! bytes from being reused until the lease runs out; an `exist` lease does not (SGLang checks existence before
//! every put, and a forced `remove_all` must then free space at once).
//!
//! Only complete replicas on healthy segments are served. Replicas on suspect segments (owner missed pings or
//! was reported unreachable) are hidden: `exist` answers `false` when no replica is healthy, and
//! `get_replica_list` fails fast with `UnavailableInCurrentStatus` (distinct from `ObjectNotFound`, so a caller
//! can tell "gone" from "unreachable right now"; neither grants a lease). An object whose first put is still in
//! flight gives `ReplicaNotReady`, as upstream.

use super::core::MasterCore;
use super::objects::ObjectState;
use crate::types::{ErrorCode, ReplicaDescriptor, ReplicaStatus, Result};

impl MasterCore {
    /// Whether `key` can be read now (see the module docs); `true` grants a lease. Empty key: `InvalidKey`.
    pub fn exist(&mut self, key: &str) -> Result<bool> {
        let now = self.now();
        self.exist_at(key, now)
    }

    /// [`MasterCore::exist`] for many keys.
    pub fn batch_exist<S: AsRef<str>>(&mut self, keys: &[S]) -> Vec<Result<bool>> {
        let now = self.now();
        keys.iter().map(|k| self.exist_at(k.as_ref(), now)).collect()
    }

    /// The readable replicas of `key` and the lease granted, in ms. Errors: `ObjectNotFound`,
    /// `ReplicaNotReady` (first put in flight), `UnavailableInCurrentStatus` (every replica unreachable).
    pub fn get_replica_list(&mut self, key: &str) -> Result<(Vec<ReplicaDescriptor>, u64)> {
        let now = self.now();
        self.get_replica_list_at(key, now)
    }

    /// [`MasterCore::get_replica_list`] for many keys.
    pub fn batch_get_replica_list<S: AsRef<str>>(&mut self, keys: &[S]) -> Vec<Result<(Vec<ReplicaDescriptor>, u64)>> {
        let now = self.now();
        keys.iter().map(|k| self.get_replica_list_at(k.as_ref(), now)).collect()
    }

    /// Length of the object in bytes, without a lease. `ReplicaNotReady` while its first put is in flight.
    pub fn get_size(&self, key: &str) -> Result<u64> {
        let o = self.object(key)?;
        if o.state == ObjectState::Processing {
            return Err(ErrorCode::ReplicaNotReady);
        }
        Ok(o.size)
    }

    fn exist_at(&mut self, key: &str, now: u64) -> Result<bool> {
        if key.is_empty() {
            return Err(ErrorCode::InvalidKey);
        }
        let Some(idx) = self.objects.find(key) else { return Ok(false) };
        let lease_ttl = self.config.default_kv_lease_ttl_ms;
        let segments = &self.segments;
        let o = self.objects.get_mut(idx).ok_or(ErrorCode::Internal)?;
        if o.state == ObjectState::Processing {
            return Err(ErrorCode::ReplicaNotReady);
        }
        if !o.replicas.iter().any(|r| segments.is_healthy(r.segment)) {
            return Ok(false);
        }
        o.grant_lease(now, lease_ttl);
        Ok(true)
    }

    fn get_replica_list_at(&mut self, key: &str, now: u64) -> Result<(Vec<ReplicaDescriptor>, u64)> {
        let idx = self.find(key)?;
        let o = self.objects.get(idx).ok_or(ErrorCode::Internal)?;
        if o.state == ObjectState::Processing {
            return Err(ErrorCode::ReplicaNotReady);
        }
        let replicas: Vec<ReplicaDescriptor> = o
            .replicas
            .iter()
            .filter(|r| self.segments.is_healthy(r.segment))
            .filter_map(|r| self.descriptor(r, ReplicaStatus::Complete))
            .collect();
        if replicas.is_empty() {
            return Err(ErrorCode::UnavailableInCurrentStatus);
        }
        let lease_ttl = self.config.default_kv_lease_ttl_ms;
        if let Some(o) = self.objects.get_mut(idx) {
            o.grant_read_lease(now, lease_ttl);
        }
        Ok((replicas, lease_ttl))
    }
}

#[cfg(test)]
mod tests {
    use crate::master::testing::harness;
    use crate::types::{ErrorCode, MasterConfig};

    #[test]
    fn missing_keys_and_sizes() {
        let mut h = harness(MasterConfig::default());
        h.mount(1, "a", "h", 1 << 20);
        assert_eq!(h.core.exist("nope"), Ok(false));
        assert_eq!(h.core.exist(""), Err(ErrorCode::InvalidKey));
        assert_eq!(h.core.get_replica_list("nope"), Err(ErrorCode::ObjectNotFound));
        assert_eq!(h.core.get_size("nope"), Err(ErrorCode::ObjectNotFound));
        assert_eq!(h.core.query_key("nope"), Err(ErrorCode::ObjectNotFound));
        h.put("k", 123).unwrap();
        assert_eq!(h.core.get_size("k"), Ok(123));
    }

    #[test]
    fn reads_grant_leases_that_block_removal_until_they_expire() {
        let mut h = harness(MasterConfig::default());
        h.mount(1, "a", "h", 1 << 20);
        h.put("k", 100).unwrap();
        assert_eq!(h.core.query_key("k").unwrap().lease_remaining_ms, 0, "put_end grants no lease");
        assert_eq!(h.core.exist("k"), Ok(true));
        assert_eq!(h.core.query_key("k").unwrap().lease_remaining_ms, 10_000);
        h.advance(6_000);
        assert_eq!(h.core.remove("k", false), Err(ErrorCode::ObjectHasLease));
        h.core.get_replica_list("k").unwrap(); // extends to now + 10 s
        h.advance(9_999);
        assert_eq!(h.core.remove("k", false), Err(ErrorCode::ObjectHasLease));
        h.advance(1);
        assert_eq!(h.core.remove("k", false), Ok(()));
        h.check();
    }
}
