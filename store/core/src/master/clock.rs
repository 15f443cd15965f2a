//! Injected time: the core never reads the system clock itself, so tests drive time by hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(not(target_os = "linux"))]
use std::time::Instant;

/// A source of milliseconds that never go backwards.
pub trait Clock: Send + Sync {
    /// Milliseconds since an arbitrary, fixed origin.
    fn now_ms(&self) -> u64;
}

/// Monotonic wall time: milliseconds since the clock was created.
///
/// On Linux each read is `CLOCK_MONOTONIC_COARSE`: the kernel's last timer tick (1-4 ms resolution, ample for
/// leases and liveness counted in seconds), read from memory. `Instant::now()` orders its TSC read, which keeps
/// the CPU from overlapping the memory accesses of consecutive requests: single-key `exist` ran ~3x slower with it
/// (see the `master_core_bench` example). Elsewhere it is `Instant::now()`.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    /// Nanoseconds of `CLOCK_MONOTONIC_COARSE` at creation.
    #[cfg(target_os = "linux")]
    origin_ns: u128,
    #[cfg(not(target_os = "linux"))]
    origin: Instant,
}

#[cfg(target_os = "linux")]
fn coarse_now_ns() -> u128 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    u128::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u128::try_from(t.tv_nsec).unwrap_or(0)
}

impl SystemClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        SystemClock {
            #[cfg(target_os = "linux")]
            origin_ns: coarse_now_ns(),
            #[cfg(not(target_os = "linux"))]
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    #[cfg(target_os = "linux")]
    fn now_ms(&self) -> u64 {
        u64::try_from(coarse_now_ns().saturating_sub(self.origin_ns) / 1_000_000).unwrap_or(u64::MAX)
    }

    #[cfg(not(target_os = "linux"))]
    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// A clock moved by hand; clones share the same time, so a test (or a service's timer) keeps one and gives one
/// to the core. Reading it is one atomic load.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock reading `start_ms`.
    pub fn new(start_ms: u64) -> Self {
        ManualClock { now: Arc::new(AtomicU64::new(start_ms)) }
    }

    /// Moves time forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.now.fetch_add(ms, Ordering::Relaxed);
    }

    /// Sets the time; values below the current time are ignored (time never goes back).
    pub fn set(&self, ms: u64) {
        self.now.fetch_max(ms, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_is_shared_and_monotonic() {
        let a = ManualClock::new(5);
        let b = a.clone();
        a.advance(10);
        assert_eq!(b.now_ms(), 15);
        b.set(3);
        assert_eq!(a.now_ms(), 15);
        b.set(100);
        assert_eq!(a.now_ms(), 100);
    }

    #[test]
    fn system_clock_does_not_go_back() {
        let c = SystemClock::new();
        let t1 = c.now_ms();
        assert!(c.now_ms() >= t1);
    }

    #[test]
    fn system_clock_follows_real_time_to_within_its_tick() {
        let c = SystemClock::new();
        let t1 = c.now_ms();
        std::thread::sleep(std::time::Duration::from_millis(50));
        // A coarse clock lags by at most one timer tick (1-10 ms); sleeping never returns early.
        assert!(c.now_ms() - t1 >= 40, "advanced {} ms over a 50 ms sleep", c.now_ms() - t1);
    }
}
