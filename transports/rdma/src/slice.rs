//! Rail choice as pure logic: a request is cut into `MC_SLICE_SIZE` slices
//! ([`mooncake_core::stripe::piece_bounds`]), slices are spread over the NICs ("rails") the
//! priority matrix prefers for the buffer's location, a failed slice is retried on a rail it has
//! not failed on, and the request completes once every slice has ([`mooncake_core::FanIn`]).

use mooncake_core::{Error, Result};

use crate::topology::Rails;

/// Largest number of NICs a slice can tell apart when retrying (bits of [`SliceAttempts`]).
pub const MAX_RAILS: usize = 64;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn rails(p: &[usize], f: &[usize]) -> Rails {
        Rails { preferred: p.to_vec(), fallback: f.to_vec() }
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
}
