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
