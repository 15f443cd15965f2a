//! Slicing and rail choice as pure logic: a request is cut into `MC_SLICE_SIZE` slices, slices
//! are spread over the NICs ("rails") the priority matrix prefers for the buffer's location, a
//! failed slice is retried on a rail it has not failed on, and the request completes once every
//! slice has.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use mooncake_core::{Completion, Error, Result};

use crate::topology::Rails;

/// Largest number of NICs a slice can tell apart when retrying (bits of [`SliceAttempts`]).
pub const MAX_RAILS: usize = 64;

/// Number of slices of a `length`-byte request.
pub fn slice_count(length: u64, slice_size: u64) -> u64 {
    length.div_ceil(slice_size.max(1))
}

/// Offset and length of slice `i` of a `length`-byte request.
pub fn slice_bounds(length: u64, slice_size: u64, i: u64) -> (u64, u32) {
    let size = slice_size.max(1);
    let offset = i.saturating_mul(size).min(length);
    (offset, (length - offset).min(size) as u32)
}

/// The rail of slice `i` on its first attempt: preferred rails round-robin from `seed`, or the
/// fallback rails when no rail is preferred. `None` when no rail exists at all.
pub fn initial_rail(rails: &Rails, seed: usize, i: usize) -> Option<usize> {
    let pool = if rails.preferred.is_empty() { &rails.fallback } else { &rails.preferred };
    if pool.is_empty() { None } else { Some(pool[seed.wrapping_add(i) % pool.len()]) }
}

/// The remote NIC for slice `i` on attempt `attempt`: round-robin over the remote rails in try
/// order (preferred first), moving one rail further on every retry.
pub fn remote_rail(rails: &Rails, seed: usize, i: usize, attempt: u32) -> Option<usize> {
    let pool = if rails.preferred.is_empty() || attempt > 0 { None } else { Some(&rails.preferred) };
    match pool {
        Some(p) => Some(p[seed.wrapping_add(i) % p.len()]),
        None => rails.nth(seed.wrapping_add(i).wrapping_add(attempt as usize)),
    }
}

/// Retry bookkeeping of one slice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SliceAttempts {
    /// Local rails this slice failed on (bit per rail index).
    pub failed: u64,
    /// Attempts made so far (the first one included).
    pub attempts: u32,
}

impl SliceAttempts {
    /// Records a failure on `rail` and picks the next rail: the first rail in try order (preferred
    /// then fallback, starting after `rail`) that this slice has not failed on. Errors when the
    /// retry budget (`max_retries` retries after the first attempt) is spent or every rail failed.
    pub fn next_after_failure(
        &mut self,
        rail: usize,
        rails: &Rails,
        max_retries: u32,
    ) -> Result<usize, RetryExhausted> {
        if rail < MAX_RAILS {
            self.failed |= 1 << rail;
        }
        self.attempts = self.attempts.saturating_add(1);
        if self.attempts > max_retries {
            return Err(RetryExhausted::Budget { attempts: self.attempts });
        }
        let n = rails.len();
        let order: Vec<usize> = (0..n).filter_map(|k| rails.nth(k)).collect();
        let start = order.iter().position(|r| *r == rail).map_or(0, |p| p + 1);
        (0..n)
            .map(|k| order[(start + k) % n])
            .find(|r| *r >= MAX_RAILS || self.failed & (1 << r) == 0)
            .ok_or(RetryExhausted::AllRails { rails: n })
    }
}

/// Why a slice is not retried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryExhausted {
    /// `MC_RETRY_CNT` retries were made.
    Budget {
        /// Attempts made.
        attempts: u32,
    },
    /// Every rail serving the location failed.
    AllRails {
        /// Number of rails.
        rails: usize,
    },
}

impl RetryExhausted {
    /// The typed error a request fails with.
    pub fn into_error(self, peer: &str, offset: u64, len: u32, last: &str) -> Error {
        let what = match self {
            RetryExhausted::Budget { attempts } => format!("gave up after {attempts} attempts (MC_RETRY_CNT)"),
            RetryExhausted::AllRails { rails } => format!("failed on all {rails} rails"),
        };
        Error::disconnected(peer, format!("RDMA slice at +{offset} ({len} bytes) {what}; last error: {last}"))
    }
}

/// Completes one request once all of its slices are done, exactly once: with the request length
/// when every slice succeeded, else with the first slice error.
#[derive(Debug)]
pub struct RequestTracker {
    remaining: AtomicU64,
    length: u64,
    error: Mutex<Option<Error>>,
    completion: Mutex<Option<Completion>>,
}

impl RequestTracker {
    /// A tracker for `slices` slices of a `length`-byte request.
    pub fn new(slices: u64, length: u64, completion: Completion) -> Self {
        RequestTracker {
            remaining: AtomicU64::new(slices),
            length,
            error: Mutex::new(None),
            completion: Mutex::new(Some(completion)),
        }
    }

    /// True when the request was canceled or timed out by the caller (skip further work).
    pub fn is_abandoned(&self) -> bool {
        self.completion.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_none_or(Completion::is_final)
    }

    /// Records the final outcome of one slice; returns true when this finished the request.
    pub fn slice_done(&self, result: Result<()>) -> bool {
        if let Err(e) = result {
            let mut g = self.error.lock().unwrap_or_else(|p| p.into_inner());
            if g.is_none() {
                *g = Some(e);
            }
        }
        let before = self.remaining.fetch_sub(1, Ordering::AcqRel);
        if before != 1 {
            return false;
        }
        let error = self.error.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(c) = self.completion.lock().unwrap_or_else(|p| p.into_inner()).take() {
            c.finish(error.map_or(Ok(self.length), Err));
        }
        true
    }
}

impl Drop for RequestTracker {
    fn drop(&mut self) {
        let completion = self.completion.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(c) = completion {
            c.finish(Err(Error::NotInitialized(
                "RDMA request dropped before all of its slices completed (transport shut down)".into(),
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use mooncake_core::{Batch, TransferState};

    use super::*;

    fn rails(p: &[usize], f: &[usize]) -> Rails {
        Rails { preferred: p.to_vec(), fallback: f.to_vec() }
    }

    #[test]
    fn slice_plan_covers_the_request_exactly() {
        let size = 64 << 10;
        assert_eq!(slice_count(1, size), 1);
        assert_eq!(slice_count(size, size), 1);
        assert_eq!(slice_count(size + 1, size), 2);
        assert_eq!(slice_count(0, size), 0);
        let len = 3 * size + 100;
        let n = slice_count(len, size);
        let mut next = 0;
        for i in 0..n {
            let (off, l) = slice_bounds(len, size, i);
            assert_eq!(off, next);
            assert!(l > 0 && u64::from(l) <= size);
            next = off + u64::from(l);
        }
        assert_eq!(next, len);
        assert_eq!(slice_bounds(len, size, 3), (3 * size, 100));
        assert_eq!(slice_bounds(len, size, 99), (len, 0));
    }

    #[test]
    fn slices_spread_over_preferred_rails_only() {
        let r = rails(&[2, 5], &[0, 1]);
        let picks: Vec<usize> = (0..6).map(|i| initial_rail(&r, 1, i).unwrap()).collect();
        assert_eq!(picks, vec![5, 2, 5, 2, 5, 2]);
        assert_eq!(initial_rail(&rails(&[], &[3, 4]), 0, 1), Some(4));
        assert_eq!(initial_rail(&rails(&[], &[]), 0, 0), None);
    }

    #[test]
    fn remote_rails_rotate_on_retry() {
        let r = rails(&[1], &[0, 2]);
        assert_eq!(remote_rail(&r, 0, 0, 0), Some(1));
        assert_eq!(remote_rail(&r, 0, 5, 0), Some(1));
        let tried: Vec<usize> = (1..4).map(|a| remote_rail(&r, 0, 0, a).unwrap()).collect();
        assert_eq!(tried, vec![0, 2, 1]);
        assert_eq!(remote_rail(&rails(&[], &[]), 0, 0, 0), None);
    }

    #[test]
    fn retry_picks_a_rail_not_yet_failed_then_gives_up() {
        let r = rails(&[0, 1], &[2]);
        let mut a = SliceAttempts::default();
        assert_eq!(a.next_after_failure(0, &r, 9), Ok(1));
        assert_eq!(a.next_after_failure(1, &r, 9), Ok(2));
        assert_eq!(a.next_after_failure(2, &r, 9), Err(RetryExhausted::AllRails { rails: 3 }));
        // Starting from the fallback wraps around to the preferred ones.
        let mut a = SliceAttempts::default();
        assert_eq!(a.next_after_failure(2, &r, 9), Ok(0));
        // A single rail cannot be retried elsewhere.
        let mut a = SliceAttempts::default();
        assert_eq!(a.next_after_failure(0, &rails(&[0], &[]), 9), Err(RetryExhausted::AllRails { rails: 1 }));
        // The retry budget bounds attempts even with rails left.
        let many = rails(&[0, 1, 2, 3], &[]);
        let mut a = SliceAttempts::default();
        assert_eq!(a.next_after_failure(0, &many, 1), Ok(1));
        assert_eq!(a.next_after_failure(1, &many, 1), Err(RetryExhausted::Budget { attempts: 2 }));
        let e = RetryExhausted::AllRails { rails: 3 }.into_error("b:1", 65536, 4096, "WR flushed");
        assert!(e.is_disconnect());
        assert!(e.to_string().contains("all 3 rails") && e.to_string().contains("WR flushed"), "{e}");
    }

    #[test]
    fn request_completes_once_when_all_slices_are_done() {
        let b = Batch::new(2);
        b.reserve(2).unwrap();
        let t = RequestTracker::new(3, 300, b.completion(0));
        assert!(!t.is_abandoned());
        assert!(!t.slice_done(Ok(())));
        assert!(!t.slice_done(Ok(())));
        assert_eq!(b.status(0).unwrap().state, TransferState::Pending);
        assert!(t.slice_done(Ok(())));
        let s = b.status(0).unwrap();
        assert_eq!((s.state, s.transferred_bytes), (TransferState::Completed, 300));

        let t = RequestTracker::new(2, 200, b.completion(1));
        assert!(!t.slice_done(Err(Error::disconnected("p", "all rails failed"))));
        assert_eq!(b.status(1).unwrap().state, TransferState::Pending, "waits for the other slice");
        assert!(t.slice_done(Ok(())));
        let s = b.status(1).unwrap();
        assert_eq!(s.state, TransferState::Failed);
        assert!(s.error.unwrap().is_disconnect());
        assert!(t.is_abandoned());
    }

    #[test]
    fn a_dropped_tracker_fails_its_request_instead_of_hanging() {
        let b = Batch::new(1);
        b.reserve(1).unwrap();
        let t = RequestTracker::new(2, 10, b.completion(0));
        t.slice_done(Ok(()));
        drop(t);
        let s = b.status(0).unwrap();
        assert_eq!(s.state, TransferState::Failed);
        assert!(matches!(s.error, Some(Error::NotInitialized(_))));
        assert!(b.is_done());
    }

    #[test]
    fn canceled_requests_are_seen_as_abandoned() {
        let b = Batch::new(1);
        b.reserve(1).unwrap();
        let t = RequestTracker::new(1, 10, b.completion(0));
        b.abort(TransferState::Canceled, Error::Canceled);
        assert!(t.is_abandoned());
        t.slice_done(Ok(()));
        assert_eq!(b.status(0).unwrap().state, TransferState::Canceled);
    }
}
