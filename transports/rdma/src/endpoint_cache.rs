//! A bounded cache of connected endpoints keyed by peer NIC path, evicting the least recently
//! used *idle* endpoints (no work requests in flight) when it grows past its bound.

use std::collections::HashMap;
use std::hash::Hash;

/// Something that can tell whether it is safe to drop.
pub trait Idle {
    /// True when nothing is in flight on it.
    fn is_idle(&self) -> bool;
}

impl<T: Idle + ?Sized> Idle for std::sync::Arc<T> {
    fn is_idle(&self) -> bool {
        (**self).is_idle()
    }
}

#[derive(Debug)]
struct Slot<V> {
    value: V,
    last_used: u64,
}

/// LRU cache with a soft bound: busy entries are never evicted, so the cache may exceed its
/// bound while every entry is busy; it shrinks back on the next insertion once they go idle.
#[derive(Debug)]
pub struct EndpointCache<K, V> {
    capacity: usize,
    tick: u64,
    map: HashMap<K, Slot<V>>,
}

impl<K: Eq + Hash + Clone, V: Idle + Clone> EndpointCache<K, V> {
    /// An empty cache holding at most `capacity` (at least 1) idle entries.
    pub fn new(capacity: usize) -> Self {
        EndpointCache { capacity: capacity.max(1), tick: 0, map: HashMap::new() }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The entry for `key`, marked as recently used.
    pub fn get(&mut self, key: &K) -> Option<V> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(key).map(|s| {
            s.last_used = tick;
            s.value.clone()
        })
    }

    /// Inserts (or replaces) `key`, then evicts least recently used idle entries other than
    /// `key` until the bound holds. Returns the replaced and evicted values for the caller to
    /// tear down outside its lock.
    pub fn insert(&mut self, key: K, value: V) -> Vec<V> {
        self.tick += 1;
        let mut dropped = Vec::new();
        if let Some(old) = self.map.insert(key.clone(), Slot { value, last_used: self.tick }) {
            dropped.push(old.value);
        }
        while self.map.len() > self.capacity {
            let victim = self
                .map
                .iter()
                .filter(|(k, s)| **k != key && s.value.is_idle())
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone());
            match victim.and_then(|k| self.map.remove(&k)) {
                Some(s) => dropped.push(s.value),
                None => break,
            }
        }
        dropped
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.map.remove(key).map(|s| s.value)
    }

    /// Removes every entry whose key matches `pred`.
    pub fn remove_where(&mut self, pred: impl Fn(&K) -> bool) -> Vec<V> {
        let keys: Vec<K> = self.map.keys().filter(|k| pred(k)).cloned().collect();
        keys.into_iter().filter_map(|k| self.remove(&k)).collect()
    }

    /// Removes everything.
    pub fn drain(&mut self) -> Vec<V> {
        self.map.drain().map(|(_, s)| s.value).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[derive(Debug)]
    struct Ep {
        name: &'static str,
        busy: AtomicBool,
    }

    impl Idle for Ep {
        fn is_idle(&self) -> bool {
            !self.busy.load(Ordering::Relaxed)
        }
    }

    fn ep(name: &'static str) -> Arc<Ep> {
        Arc::new(Ep { name, busy: AtomicBool::new(false) })
    }

    #[test]
    fn evicts_least_recently_used_idle_entry() {
        let mut c = EndpointCache::new(2);
        assert!(c.insert("a", ep("a")).is_empty());
        assert!(c.insert("b", ep("b")).is_empty());
        assert_eq!(c.get(&"a").unwrap().name, "a");
        let dropped = c.insert("c", ep("c"));
        assert_eq!(dropped.iter().map(|e| e.name).collect::<Vec<_>>(), ["b"]);
        assert!(c.get(&"b").is_none());
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn busy_entries_survive_and_the_bound_recovers() {
        let mut c = EndpointCache::new(2);
        let a = ep("a");
        let b = ep("b");
        a.busy.store(true, Ordering::Relaxed);
        b.busy.store(true, Ordering::Relaxed);
        c.insert("a", a.clone());
        c.insert("b", b.clone());
        assert!(c.insert("c", ep("c")).is_empty(), "nothing idle to evict");
        assert_eq!(c.len(), 3);
        b.busy.store(false, Ordering::Relaxed);
        let dropped = c.insert("d", ep("d"));
        assert_eq!(dropped.iter().map(|e| e.name).collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(c.len(), 2);
        assert!(c.get(&"a").is_some() && c.get(&"d").is_some());
    }

    #[test]
    fn replace_remove_and_drain() {
        let mut c = EndpointCache::new(4);
        c.insert("x@mlx5_0", ep("1"));
        let old = c.insert("x@mlx5_0", ep("2"));
        assert_eq!(old[0].name, "1");
        c.insert("y@mlx5_0", ep("3"));
        c.insert("x@mlx5_1", ep("4"));
        let gone = c.remove_where(|k| k.starts_with("x@"));
        assert_eq!(gone.len(), 2);
        assert_eq!(c.len(), 1);
        assert_eq!(c.remove(&"y@mlx5_0").unwrap().name, "3");
        c.insert("z", ep("5"));
        assert_eq!(c.drain().len(), 1);
        assert!(c.is_empty());
        assert_eq!(EndpointCache::<&str, Arc<Ep>>::new(0).capacity, 1);
    }
}
