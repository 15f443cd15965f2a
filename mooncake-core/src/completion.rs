//! Per-request completion slots grouped in batches. Transports finish requests through a
//! [`Completion`]; callers poll a slot's state, await the batch, or block on it.

use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::error::{Error, Result};
use crate::sync;
use crate::types::{TransferState, TransferStatus};

#[derive(Debug, Default)]
struct Slot {
    state: AtomicU8,
    transferred: AtomicU64,
    error: Mutex<Option<Error>>,
}

/// A fixed-capacity group of requests that complete independently.
#[derive(Debug)]
pub struct Batch {
    slots: Box<[Slot]>,
    /// Slots handed out so far (submissions accumulate up to capacity).
    used: AtomicUsize,
    /// Submitted slots not yet final.
    outstanding: AtomicUsize,
    async_done: Notify,
    /// Threads blocked in [`Batch::wait_done_for`]; the last completion signals `blocking_done` only when
    /// there are any (a condition variable's signal is a system call even when nobody waits).
    blocking_lock: Mutex<usize>,
    blocking_done: Condvar,
}

impl Batch {
    /// A batch with room for `capacity` requests.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Batch {
            slots: (0..capacity).map(|_| Slot::default()).collect(),
            used: AtomicUsize::new(0),
            outstanding: AtomicUsize::new(0),
            async_done: Notify::new(),
            blocking_lock: Mutex::new(0),
            blocking_done: Condvar::new(),
        })
    }

    /// Capacity given at creation.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Number of requests submitted so far.
    pub fn len(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// True before anything was submitted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reserves `n` slots, marking them pending; returns the first index.
    /// Fails with [`Error::TooManyRequests`] when the capacity would be exceeded.
    pub fn reserve(self: &Arc<Self>, n: usize) -> Result<usize> {
        let capacity = self.capacity();
        let mut start = self.used.load(Ordering::Acquire);
        loop {
            let end = start
                .checked_add(n)
                .filter(|e| *e <= capacity)
                .ok_or(Error::TooManyRequests { capacity, requested: start.saturating_add(n) })?;
            match self.used.compare_exchange(start, end, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => start = now,
            }
        }
        self.outstanding.fetch_add(n, Ordering::AcqRel);
        for slot in &self.slots[start..start + n] {
            slot.transferred.store(0, Ordering::Relaxed);
            slot.state.store(TransferState::Pending as u8, Ordering::Release);
        }
        Ok(start)
    }

    /// The completion handle of slot `index` (a slot obtained from [`Batch::reserve`]).
    pub fn completion(self: &Arc<Self>, index: usize) -> Completion {
        Completion { batch: self.clone(), index }
    }

    /// Status of slot `index`.
    pub fn status(&self, index: usize) -> Result<TransferStatus> {
        let slot = self.slots.get(index).filter(|_| index < self.len()).ok_or_else(|| {
            Error::InvalidArgument(format!("task {index} is not in this batch ({} submitted)", self.len()))
        })?;
        let state = TransferState::from_u8(slot.state.load(Ordering::Acquire));
        let error =
            if state.is_final() && state != TransferState::Completed { sync::lock(&slot.error).clone() } else { None };
        Ok(TransferStatus { state, transferred_bytes: slot.transferred.load(Ordering::Acquire), error })
    }

    /// Outcome of slot `index`: the bytes moved once it completed, else its error (a slot that ended without
    /// one, or has not ended, is a `Protocol` error naming its state).
    pub fn result(&self, index: usize) -> Result<u64> {
        let s = self.status(index)?;
        match s.state {
            TransferState::Completed => Ok(s.transferred_bytes),
            state => Err(s.error.unwrap_or_else(|| Error::Protocol(format!("transfer ended as {state:?}")))),
        }
    }

    /// Aggregate status: completed when all are, failed (with the first error) when any failed,
    /// pending otherwise.
    pub fn overall(&self) -> TransferStatus {
        let mut transferred = 0;
        let mut failed: Option<TransferStatus> = None;
        let mut pending = false;
        for i in 0..self.len() {
            let Ok(s) = self.status(i) else { continue };
            transferred += s.transferred_bytes;
            match s.state {
                TransferState::Completed => {}
                TransferState::Pending | TransferState::Waiting => pending = true,
                _ => {
                    if failed.is_none() {
                        failed = Some(s);
                    }
                }
            }
        }
        match failed {
            Some(mut f) if !pending => {
                f.transferred_bytes = transferred;
                f
            }
            _ if pending => {
                TransferStatus { state: TransferState::Pending, transferred_bytes: transferred, error: None }
            }
            _ => TransferStatus { state: TransferState::Completed, transferred_bytes: transferred, error: None },
        }
    }

    /// True when every submitted request is final.
    pub fn is_done(&self) -> bool {
        self.outstanding.load(Ordering::Acquire) == 0
    }

    /// Waits until every submitted request is final (runtime-agnostic).
    pub async fn wait(&self) {
        loop {
            let notified = self.async_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_done() {
                return;
            }
            notified.await;
        }
    }

    /// Blocks the calling thread until every request is final or `timeout` passes.
    /// On timeout the unfinished requests are marked [`TransferState::Timeout`].
    pub fn wait_blocking(&self, timeout: Duration) -> Result<()> {
        if self.wait_done_for(timeout) {
            return Ok(());
        }
        self.abort(TransferState::Timeout, Error::Timeout(timeout));
        Err(Error::Timeout(timeout))
    }

    /// Blocks the calling thread for at most `timeout` and tells whether every submitted request is final.
    /// Unlike [`Batch::wait_blocking`] it marks nothing on expiry, so a caller can wait in slices (and
    /// check for a Ctrl-C between them).
    pub fn wait_done_for(&self, timeout: Duration) -> bool {
        self.spin_until_done(spin_budget().min(timeout));
        let deadline = Instant::now().checked_add(timeout);
        let mut guard = sync::lock(&self.blocking_lock);
        *guard += 1;
        let mut done = true;
        while !self.is_done() {
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                done = false;
                break;
            }
            guard = sync::wait_timeout(&self.blocking_done, guard, left).0;
        }
        *guard -= 1;
        done
    }

    /// Polls for completion for up to `budget` before the caller goes to sleep. Waking a sleeping
    /// thread costs tens of microseconds on virtual machines; small transfers finish sooner
    /// (upstream's sync calls poll the same way).
    fn spin_until_done(&self, budget: Duration) {
        if budget.is_zero() {
            return;
        }
        let start = Instant::now();
        let mut spins = 0u32;
        while !self.is_done() && start.elapsed() < budget {
            spins = spins.wrapping_add(1);
            if spins % 64 == 0 {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Marks every unfinished request with `state` (canceled or timed out). Transports that finish
    /// them later are ignored; they check [`Completion::is_final`] before starting work.
    pub fn abort(&self, state: TransferState, error: Error) {
        for i in 0..self.len() {
            self.finish_slot(i, state, 0, Some(error.clone()));
        }
    }

    fn finish_slot(&self, index: usize, state: TransferState, bytes: u64, error: Option<Error>) -> bool {
        let slot = &self.slots[index];
        if let Some(e) = error {
            let mut g = sync::lock(&slot.error);
            if g.is_none() && !TransferState::from_u8(slot.state.load(Ordering::Acquire)).is_final() {
                *g = Some(e);
            }
        }
        if slot
            .state
            .compare_exchange(TransferState::Pending as u8, state as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        slot.transferred.store(bytes, Ordering::Release);
        if self.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.async_done.notify_waiters();
            // A waiter counts itself and checks `is_done` under the lock, and sleeps releasing it: either it
            // sees this completion, or it is counted here.
            if *sync::lock(&self.blocking_lock) > 0 {
                self.blocking_done.notify_all();
            }
        }
        true
    }
}

/// How long blocking waits poll before sleeping (`MC_SYNC_SPIN_US`, default 100 us; 0 disables).
fn spin_budget() -> Duration {
    static BUDGET: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| {
        let us = std::env::var("MC_SYNC_SPIN_US").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(100);
        Duration::from_micros(us)
    })
}

/// Handle through which a transport finishes one request exactly once.
#[derive(Debug)]
pub struct Completion {
    batch: Arc<Batch>,
    index: usize,
}

impl Completion {
    /// Finishes the request: `Ok(bytes)` completes it, `Err` fails it with a typed error.
    pub fn finish(self, result: Result<u64>) {
        self.finish_shared(result);
    }

    /// [`Completion::finish`] through a shared reference, for owners that guarantee a single call
    /// themselves (the [`FanIn`](crate::fanin::FanIn) counter); later calls are ignored anyway.
    pub(crate) fn finish_shared(&self, result: Result<u64>) {
        match result {
            Ok(bytes) => self.batch.finish_slot(self.index, TransferState::Completed, bytes, None),
            Err(e) => {
                let state = match e {
                    Error::Timeout(_) => TransferState::Timeout,
                    Error::Canceled => TransferState::Canceled,
                    _ => TransferState::Failed,
                };
                self.batch.finish_slot(self.index, state, 0, Some(e))
            }
        };
    }

    /// True when the request was already canceled or timed out (skip the work).
    pub fn is_final(&self) -> bool {
        TransferState::from_u8(self.batch.slots[self.index].state.load(Ordering::Acquire)).is_final()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_respects_capacity() {
        let b = Batch::new(3);
        assert_eq!(b.reserve(2).unwrap(), 0);
        assert!(matches!(b.reserve(2), Err(Error::TooManyRequests { capacity: 3, requested: 4 })));
        assert_eq!(b.reserve(1).unwrap(), 2);
        assert!(b.status(3).is_err());
    }

    #[test]
    fn completes_once_and_reports() {
        let b = Batch::new(2);
        b.reserve(2).unwrap();
        assert!(!b.is_done());
        b.completion(0).finish(Ok(10));
        b.completion(0).finish(Err(Error::Canceled));
        assert_eq!(b.status(0).unwrap().state, TransferState::Completed);
        assert_eq!(b.overall().state, TransferState::Pending);
        b.completion(1).finish(Err(Error::disconnected("p", "reset")));
        assert!(b.is_done());
        let s = b.overall();
        assert_eq!(s.state, TransferState::Failed);
        assert_eq!(s.transferred_bytes, 10);
        assert!(s.error.unwrap().is_disconnect());
    }

    #[test]
    fn blocking_wait_times_out_and_marks() {
        let b = Batch::new(1);
        b.reserve(1).unwrap();
        assert!(matches!(b.wait_blocking(Duration::from_millis(10)), Err(Error::Timeout(_))));
        assert_eq!(b.status(0).unwrap().state, TransferState::Timeout);
        let c = b.completion(0);
        assert!(c.is_final());
        c.finish(Ok(1));
        assert_eq!(b.status(0).unwrap().state, TransferState::Timeout);
        assert!(matches!(b.result(0), Err(Error::Timeout(_))), "{:?}", b.result(0));
    }

    #[test]
    fn result_is_bytes_or_the_slot_error() {
        let b = Batch::new(3);
        b.reserve(3).unwrap();
        b.completion(0).finish(Ok(10));
        b.completion(1).finish(Err(Error::Canceled));
        assert_eq!(b.result(0).unwrap(), 10);
        assert!(matches!(b.result(1), Err(Error::Canceled)));
        assert!(matches!(b.result(2), Err(Error::Protocol(m)) if m.contains("Pending")), "{:?}", b.result(2));
        assert!(matches!(b.result(3), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn sliced_wait_marks_nothing_and_sees_completion() {
        let b = Batch::new(1);
        b.reserve(1).unwrap();
        assert!(!b.wait_done_for(Duration::from_millis(5)));
        assert_eq!(b.status(0).unwrap().state, TransferState::Pending);
        let c = b.completion(0);
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            c.finish(Ok(3));
        });
        assert!(b.wait_done_for(Duration::from_secs(10)));
        h.join().unwrap();
        assert_eq!(b.status(0).unwrap().state, TransferState::Completed);
    }

    #[test]
    fn waiters_wake_from_other_threads() {
        let b = Batch::new(1);
        b.reserve(1).unwrap();
        let c = b.completion(0);
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            c.finish(Ok(7));
        });
        b.wait_blocking(Duration::from_secs(10)).unwrap();
        h.join().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(b.wait());
        assert_eq!(b.status(0).unwrap().transferred_bytes, 7);
    }
}
