//! Runs a future to completion on the calling (user) thread, inside the client runtime's context.
//!
//! The RPC connection's reader and writer tasks live on the client runtime; the caller only awaits its
//! reply. Polling on the calling thread saves a hand-off to a runtime thread and back, and a short spin before
//! parking avoids the cost of waking a sleeping thread (tens of microseconds on virtual machines) for replies
//! that arrive quickly. Unlike `Runtime::block_on`, this never panics when the caller is itself inside some
//! tokio runtime.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long the caller polls for a wake-up before it parks.
const SPIN: Duration = Duration::from_micros(60);

struct Signal {
    woken: AtomicBool,
    thread: Thread,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.woken.swap(true, Ordering::AcqRel) {
            self.thread.unpark();
        }
    }
}

/// Polls `fut` on this thread until it is ready, with `handle`'s runtime entered (timers, spawns). The runtime
/// is entered only while polling: build timers inside `fut` (an `async` block or fn), not in the argument.
pub(crate) fn block_on<F: Future>(handle: &tokio::runtime::Handle, fut: F) -> F::Output {
    let _entered = handle.enter();
    let signal = Arc::new(Signal { woken: AtomicBool::new(false), thread: std::thread::current() });
    let waker = Waker::from(signal.clone());
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        let start = Instant::now();
        let mut spins = 0u32;
        while !signal.woken.swap(false, Ordering::AcqRel) {
            if start.elapsed() < SPIN {
                spins = spins.wrapping_add(1);
                if spins % 64 == 0 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::park();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_timers_and_cross_thread_wakeups() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let h = rt.handle().clone();
        assert_eq!(block_on(&h, async { 7 }), 7);
        block_on(&h, async { tokio::time::sleep(Duration::from_millis(5)).await });
        let (tx, rx) = tokio::sync::oneshot::channel();
        h.spawn(async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let _ = tx.send(3);
        });
        assert_eq!(block_on(&h, rx).unwrap(), 3);
        let timed_out =
            block_on(&h, async { tokio::time::timeout(Duration::from_millis(5), std::future::pending::<()>()).await });
        assert!(timed_out.is_err());
        rt.shutdown_background();
    }
}
