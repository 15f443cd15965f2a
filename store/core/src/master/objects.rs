//! The object table: every object's metadata in one dense `Vec`, found by key through a hash index of `u32`
//! positions. Removal swaps the last object into the hole, so scans (eviction, unmount) touch no gaps.
//!
//! Memory per object is the `Object` itself (~136 bytes, key inline up to 22 bytes) plus ~10 bytes of index.

use hashbrown::{DefaultHashBuilder, HashTable};
use smallvec::SmallVec;
use std::hash::BuildHasher;

use super::groups::GroupIds;
use super::key::CompactKey;
use crate::allocator::Allocation;
use crate::types::ReplicaStatus;

/// One replica: which segment (slot index) and where in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Replica {
    pub(crate) segment: u32,
    pub(crate) alloc: Allocation,
}

/// Replicas of one object; one replica needs no heap block.
pub(crate) type Replicas = SmallVec<[Replica; 1]>;

/// Whether the object's first write has finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ObjectState {
    /// `put_start` done, `put_end` not yet: invisible to readers.
    Processing,
    /// Readable.
    Complete,
}

impl ObjectState {
    /// The status its replicas show on the wire.
    pub(crate) fn replica_status(self) -> ReplicaStatus {
        match self {
            ObjectState::Processing => ReplicaStatus::Processing,
            ObjectState::Complete => ReplicaStatus::Complete,
        }
    }
}

/// Pin and group settings of a write, applied when it completes.
#[derive(Debug)]
pub(crate) struct Protection {
    pub(crate) hard_pin: bool,
    /// Soft pin length in ms; 0 for none.
    pub(crate) soft_pin_ttl: u64,
    pub(crate) groups: GroupIds,
}

/// An upsert in flight on a complete object: new replicas being written while readers use the old ones.
#[derive(Debug)]
pub(crate) struct PendingUpsert {
    pub(crate) replicas: Replicas,
    pub(crate) size: u64,
    pub(crate) started: u64,
    pub(crate) protection: Protection,
}

/// A copy or move task's new replicas, being written while readers use the object's replicas.
#[derive(Debug)]
pub(crate) struct PendingCopy {
    pub(crate) task: super::tasks::TaskId,
    pub(crate) replicas: Replicas,
    /// The replica being read (for a move, the one to drop).
    pub(crate) source: Replica,
}

/// Metadata of one object. Times are milliseconds of the core's clock.
#[derive(Debug)]
pub(crate) struct Object {
    pub(crate) key: CompactKey,
    pub(crate) size: u64,
    pub(crate) replicas: Replicas,
    pub(crate) state: ObjectState,
    /// Leased (by exist or get) until then: not evicted, not removed without force; 0 for never leased.
    pub(crate) lease_until: u64,
    /// Readers holding replica addresses (get_replica_list) may be reading until then, so the bytes are not
    /// reused before; an `exist` lease does not extend it (it hands out no addresses).
    pub(crate) read_until: u64,
    /// Last read or admission; while `Processing`, the time of `put_start`.
    pub(crate) last_access: u64,
    pub(crate) soft_pin_until: u64,
    pub(crate) soft_pin_ttl: u64,
    pub(crate) groups: GroupIds,
    /// Eviction epoch at admission (`put_end`); see the eviction module.
    pub(crate) admitted_epoch: u32,
    pub(crate) hard_pin: bool,
    pub(crate) upsert: Option<Box<PendingUpsert>>,
}

impl Object {
    /// A write (first put or upsert) is in flight.
    pub(crate) fn is_writing(&self) -> bool {
        self.state == ObjectState::Processing || self.upsert.is_some()
    }

    pub(crate) fn is_leased(&self, now: u64) -> bool {
        self.lease_until > now
    }

    pub(crate) fn is_soft_pinned(&self, now: u64) -> bool {
        self.soft_pin_until > now
    }

    /// A read that hands out replica addresses: [`Object::grant_lease`], and the bytes stay in place until
    /// the lease ends even if the object is removed or replaced.
    pub(crate) fn grant_read_lease(&mut self, now: u64, lease_ttl: u64) {
        self.grant_lease(now, lease_ttl);
        self.read_until = self.read_until.max(now.saturating_add(lease_ttl));
    }

    /// A read: extends the lease and the soft pin, and marks the object recently used.
    pub(crate) fn grant_lease(&mut self, now: u64, lease_ttl: u64) {
        self.lease_until = self.lease_until.max(now.saturating_add(lease_ttl));
        self.last_access = now;
        if self.soft_pin_ttl > 0 {
            self.soft_pin_until = self.soft_pin_until.max(now.saturating_add(self.soft_pin_ttl));
        }
    }

    /// Makes the object readable now, in eviction epoch `epoch`.
    pub(crate) fn admit(&mut self, now: u64, epoch: u32) {
        self.state = ObjectState::Complete;
        self.admitted_epoch = epoch;
        self.last_access = now;
        self.soft_pin_until = if self.soft_pin_ttl > 0 { now.saturating_add(self.soft_pin_ttl) } else { 0 };
    }
}

/// Dense object storage with a key index.
#[derive(Debug, Default)]
pub(crate) struct ObjectTable {
    objects: Vec<Object>,
    index: HashTable<u32>,
    hasher: DefaultHashBuilder,
}

impl ObjectTable {
    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    pub(crate) fn len(&self) -> usize {
        self.objects.len()
    }

    /// Position of the object with `key`.
    pub(crate) fn find(&self, key: &str) -> Option<usize> {
        let objects = &self.objects;
        self.index
            .find(self.hash(key.as_bytes()), |&i| objects[i as usize].key.as_bytes() == key.as_bytes())
            .map(|&i| i as usize)
    }

    pub(crate) fn get(&self, idx: usize) -> Option<&Object> {
        self.objects.get(idx)
    }

    pub(crate) fn get_mut(&mut self, idx: usize) -> Option<&mut Object> {
        self.objects.get_mut(idx)
    }

    pub(crate) fn iter(&self) -> std::slice::Iter<'_, Object> {
        self.objects.iter()
    }

    /// Adds an object whose key is not present (callers check with [`ObjectTable::find`] first).
    pub(crate) fn insert(&mut self, object: Object) -> usize {
        let hash = self.hash(object.key.as_bytes());
        let idx = self.objects.len();
        self.objects.push(object);
        let (objects, hasher) = (&self.objects, &self.hasher);
        self.index.insert_unique(hash, idx as u32, |&i| hasher.hash_one(objects[i as usize].key.as_bytes()));
        idx
    }

    /// Takes out the object at `idx`; the last object moves into its place.
    pub(crate) fn remove_at(&mut self, idx: usize) -> Option<Object> {
        let hash = self.hash(self.objects.get(idx)?.key.as_bytes());
        if let Ok(entry) = self.index.find_entry(hash, |&i| i as usize == idx) {
            entry.remove();
        }
        let last = self.objects.len() - 1;
        if idx != last {
            let last_hash = self.hash(self.objects[last].key.as_bytes());
            if let Some(slot) = self.index.find_mut(last_hash, |&i| i as usize == last) {
                *slot = idx as u32;
            }
        }
        Some(self.objects.swap_remove(idx))
    }

    /// Checks that the index and the vector agree.
    #[cfg(test)]
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.index.len() != self.objects.len() {
            return Err(format!("index has {} entries for {} objects", self.index.len(), self.objects.len()));
        }
        for (i, o) in self.objects.iter().enumerate() {
            if self.find(o.key.as_str()) != Some(i) {
                return Err(format!("key {:?} not indexed at {i}", o.key));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::OffsetAllocator;

    fn object(key: &str) -> Object {
        let alloc = OffsetAllocator::new(64).allocate(8).unwrap();
        Object {
            key: CompactKey::new(key),
            size: 8,
            replicas: smallvec::smallvec![Replica { segment: 0, alloc }],
            state: ObjectState::Processing,
            lease_until: 0,
            read_until: 0,
            last_access: 0,
            soft_pin_until: 0,
            soft_pin_ttl: 0,
            groups: None,
            admitted_epoch: 0,
            hard_pin: false,
            upsert: None,
        }
    }

    #[test]
    fn insert_find_remove_keeps_index_consistent() {
        let mut t = ObjectTable::default();
        for i in 0..100 {
            t.insert(object(&format!("k{i}")));
        }
        t.check().unwrap();
        for i in (0..100).step_by(3) {
            let idx = t.find(&format!("k{i}")).unwrap();
            assert_eq!(t.remove_at(idx).unwrap().key.as_str(), format!("k{i}"));
            t.check().unwrap();
        }
        assert!(t.find("k0").is_none());
        assert!(t.find("k1").is_some());
        assert!(t.remove_at(1000).is_none());
        assert_eq!(t.len(), 66);
    }

    #[test]
    fn object_stays_small() {
        assert!(std::mem::size_of::<Object>() <= 144, "{}", std::mem::size_of::<Object>());
    }
}
