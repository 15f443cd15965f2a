//! Explicit removal. Without `force`, an object being written gives `ReplicaNotReady` and a leased object
//! gives `ObjectHasLease`. With `force` both are removed; bytes whose addresses a reader got from
//! `get_replica_list` are still not reused until that lease runs out (the allocation is freed by `tick` then),
//! so a reader in flight never sees them change. An object only checked with `exist` is freed at once.

use regex::RegexBuilder;

use super::core::MasterCore;
use crate::types::{ErrorCode, Result};

/// Size limit of a compiled `remove_by_regex` pattern, against patterns that would eat the master's memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl MasterCore {
    /// Removes `key` (see the module docs). `ObjectNotFound` when absent.
    pub fn remove(&mut self, key: &str, force: bool) -> Result<()> {
        let idx = self.find(key)?;
        self.check_removable(idx, force)?;
        self.remove_object(idx);
        Ok(())
    }

    /// [`MasterCore::remove`] for many keys.
    pub fn batch_remove<S: AsRef<str>>(&mut self, keys: &[S], force: bool) -> Vec<Result<()>> {
        keys.iter().map(|k| self.remove(k.as_ref(), force)).collect()
    }

    /// Removes every removable object whose key contains a match of `pattern` (unanchored, like upstream's
    /// `regex_search`) and returns how many went. A pattern that does not compile: `InvalidParams`.
    pub fn remove_by_regex(&mut self, pattern: &str, force: bool) -> Result<u64> {
        let re =
            RegexBuilder::new(pattern).size_limit(REGEX_SIZE_LIMIT).build().map_err(|_| ErrorCode::InvalidParams)?;
        Ok(self.remove_where(force, |key| re.is_match(key)))
    }

    /// Removes every removable object and returns how many went.
    pub fn remove_all(&mut self, force: bool) -> u64 {
        self.remove_where(force, |_| true)
    }

    /// Clears replicas of keys whose lease has run out and that no write is in flight on (missing keys and
    /// the others are skipped). With an empty `segment` the whole object goes; otherwise only its replica on
    /// that segment, and the object with it when that was its last. Returns the keys cleared, in order.
    /// Bytes a reader got addresses of stay in place until its lease runs out, as with `remove`.
    pub fn replica_clear<S: AsRef<str>>(&mut self, keys: &[S], segment: &str) -> Vec<String> {
        let target = if segment.is_empty() {
            None
        } else {
            match self.segments.find(segment) {
                Some(slot) => Some(slot),
                None => return Vec::new(),
            }
        };
        let mut cleared = Vec::new();
        for key in keys {
            let key = key.as_ref();
            let Ok(idx) = self.find(key) else { continue };
            if self.check_removable(idx, false).is_err() {
                continue;
            }
            let Some(slot) = target else {
                self.remove_object(idx);
                cleared.push(key.to_string());
                continue;
            };
            let Some(o) = self.objects.get_mut(idx) else { continue };
            let Some(pos) = o.replicas.iter().position(|r| r.segment == slot) else { continue };
            if o.replicas.len() == 1 {
                self.remove_object(idx);
            } else {
                let replica = o.replicas.remove(pos);
                let read_until = o.read_until;
                self.release_replicas([replica], read_until);
            }
            cleared.push(key.to_string());
        }
        cleared
    }

    fn check_removable(&self, idx: usize, force: bool) -> Result<()> {
        let o = self.objects.get(idx).ok_or(ErrorCode::Internal)?;
        if force {
            Ok(())
        } else if o.is_writing() {
            Err(ErrorCode::ReplicaNotReady)
        } else if o.is_leased(self.now()) {
            Err(ErrorCode::ObjectHasLease)
        } else {
            Ok(())
        }
    }

    fn remove_where(&mut self, force: bool, matches: impl Fn(&str) -> bool) -> u64 {
        let mut removed = 0;
        for i in (0..self.objects.len()).rev() {
            let hit = self.objects.get(i).is_some_and(|o| matches(o.key.as_str()));
            if hit && self.check_removable(i, force).is_ok() {
                self.remove_object(i);
                removed += 1;
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use crate::master::testing::{cfg, harness, quiet};
    use crate::types::{ClientId, ErrorCode};

    #[test]
    fn remove_respects_writes_and_leases_unless_forced() {
        let mut h = harness(quiet());
        h.mount(1, "a", "h", 1 << 20);
        h.core.put_start(ClientId(1), "w", 100, &cfg(1)).unwrap();
        assert_eq!(h.core.remove("w", false), Err(ErrorCode::ReplicaNotReady));
        assert_eq!(h.core.remove("w", true), Ok(()));
        assert_eq!(h.core.remove("w", true), Err(ErrorCode::ObjectNotFound));
        assert_eq!(h.core.remove("", true), Err(ErrorCode::InvalidKey));
        // An `exist` lease blocks removal without force, but hands out no addresses: forced removal frees at once.
        h.put("e", 100).unwrap();
        h.core.exist("e").unwrap();
        assert_eq!(h.core.remove("e", false), Err(ErrorCode::ObjectHasLease));
        h.core.remove("e", true).unwrap();
        assert_eq!(h.core.stats().allocated_bytes, 0);
        h.check();
        h.put("r", 100).unwrap();
        h.core.get_replica_list("r").unwrap();
        assert_eq!(h.core.remove("r", false), Err(ErrorCode::ObjectHasLease));
        h.core.remove("r", true).unwrap();
        // A reader holds the addresses: forced removal hides the key at once but keeps the bytes until the lease ends.
        assert_eq!(h.core.exist("r"), Ok(false));
        assert_eq!(h.core.stats().allocated_bytes, 104);
        h.check();
        h.advance(10_000);
        h.core.tick();
        assert_eq!(h.core.stats().allocated_bytes, 0);
        h.check();
    }

    #[test]
    fn replica_clear_skips_leased_and_writing_objects_and_clears_one_segment() {
        let mut h = harness(quiet());
        h.mount(1, "a", "h1", 1 << 20);
        h.mount(2, "b", "h2", 1 << 20);
        h.put("free", 10).unwrap();
        h.core.put_start(ClientId(1), "two", 10, &cfg(2)).unwrap();
        h.core.put_end(ClientId(1), "two").unwrap();
        h.core.put_start(ClientId(1), "writing", 10, &cfg(1)).unwrap();
        h.put("leased", 10).unwrap();
        h.core.get_replica_list("leased").unwrap();
        let keys = ["free", "writing", "leased", "missing"];
        assert_eq!(h.core.replica_clear(&keys, ""), vec!["free".to_string()]);
        assert!(!h.has("free") && h.has("leased"));
        assert_eq!(h.core.replica_clear(&["two"], "nosuch"), Vec::<String>::new());
        assert_eq!(h.core.replica_clear(&["two"], "b"), vec!["two".to_string()]);
        assert_eq!(h.core.get_replica_list("two").unwrap().0.len(), 1);
        // Its last replica: the object goes too.
        let last = h.core.get_replica_list("two").unwrap().0[0].segment.clone();
        h.advance(10_000);
        h.core.tick();
        assert_eq!(h.core.replica_clear(&["two"], &last), vec!["two".to_string()]);
        assert!(!h.has("two"));
        h.check();
    }

    #[test]
    fn remove_by_regex_and_remove_all() {
        let mut h = harness(quiet());
        h.mount(1, "a", "h", 1 << 20);
        for k in ["user-1", "user-2", "user-3", "sys-1", "sys-2"] {
            h.put(k, 10).unwrap();
        }
        h.core.exist("user-3").unwrap();
        assert_eq!(h.core.remove_by_regex("(", false), Err(ErrorCode::InvalidParams));
        assert_eq!(h.core.remove_by_regex("^user-", false), Ok(2));
        assert_eq!(h.core.remove_by_regex("-[0-9]$", false), Ok(2));
        assert!(h.has("user-3"));
        assert_eq!(h.core.remove_all(false), 0);
        assert_eq!(h.core.remove_all(true), 1);
        assert_eq!(h.core.stats().key_count, 0);
        h.check();
    }
}
