//! Poison-tolerant locking: the one place the workspace decides what a poisoned lock means.
//!
//! A `std` lock is poisoned when a thread panics while holding it. Every lock in the transports,
//! the engine and the plugins guards data that stays consistent across a panic (maps, queues,
//! options, counters updated in one step), and a transport must keep finishing requests after a
//! panic on some other thread rather than cascade it into every later caller (which would turn
//! one bug into hung transfers). So these helpers take the guard out of the poison error and go
//! on. Code whose data could be left half-updated by a panic should not use them.
//!
//! ```
//! use std::sync::Mutex;
//! let m = Mutex::new(1);
//! *mooncake_core::sync::lock(&m) += 1;
//! assert_eq!(*mooncake_core::sync::lock(&m), 2);
//! ```

use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, WaitTimeoutResult};
use std::time::Duration;

/// Locks `m`, recovering the guard if a panicking thread poisoned it.
#[inline]
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Read-locks `l`, recovering the guard if a panicking thread poisoned it.
#[inline]
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// Write-locks `l`, recovering the guard if a panicking thread poisoned it.
#[inline]
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// The data of a mutex held exclusively (no locking), poisoned or not.
#[inline]
pub fn get_mut<T: ?Sized>(m: &mut Mutex<T>) -> &mut T {
    m.get_mut().unwrap_or_else(|p| p.into_inner())
}

/// [`Condvar::wait`] that recovers the guard of a poisoned mutex.
#[inline]
pub fn wait<'a, T>(c: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    c.wait(guard).unwrap_or_else(|p| p.into_inner())
}

/// [`Condvar::wait_timeout`] that recovers the guard of a poisoned mutex.
#[inline]
pub fn wait_timeout<'a, T>(
    c: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> (MutexGuard<'a, T>, WaitTimeoutResult) {
    c.wait_timeout(guard, timeout).unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn poison<L: Send + Sync + 'static>(l: Arc<L>, hold: impl Fn(&L) + Send + 'static) {
        let r = std::thread::spawn(move || {
            hold(&l);
        })
        .join();
        assert!(r.is_err(), "the helper thread panicked while holding the lock");
    }

    #[test]
    fn a_poisoned_mutex_still_locks() {
        let m = Arc::new(Mutex::new(vec![1]));
        poison(m.clone(), |m| {
            let _g = m.lock().unwrap();
            panic!("poisoning on purpose");
        });
        assert!(m.is_poisoned());
        lock(&m).push(2);
        assert_eq!(*lock(&m), vec![1, 2]);
        let mut m = Arc::try_unwrap(m).unwrap();
        get_mut(&mut m).push(3);
        assert_eq!(*lock(&m), vec![1, 2, 3]);
    }

    #[test]
    fn a_poisoned_rwlock_still_reads_and_writes() {
        let l = Arc::new(RwLock::new(1));
        poison(l.clone(), |l| {
            let _g = l.write().unwrap();
            panic!("poisoning on purpose");
        });
        assert!(l.is_poisoned());
        *write(&l) += 1;
        assert_eq!(*read(&l), 2);
    }

    #[test]
    fn condvar_waits_survive_poison() {
        let pair = Arc::new((Mutex::new(false), Condvar::new()));
        poison(pair.clone(), |p| {
            let _g = p.0.lock().unwrap();
            panic!("poisoning on purpose");
        });
        let (m, c) = &*pair;
        let (g, timed_out) = wait_timeout(c, lock(m), Duration::from_millis(1));
        assert!(timed_out.timed_out() && !*g);
        drop(g);
        let setter = {
            let pair = pair.clone();
            std::thread::spawn(move || {
                *lock(&pair.0) = true;
                pair.1.notify_all();
            })
        };
        let mut g = lock(m);
        while !*g {
            g = wait(c, g);
        }
        drop(g);
        setter.join().unwrap();
    }
}
