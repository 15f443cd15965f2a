//! Blocking work with the GIL released, and waits that a Ctrl-C can interrupt.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use mooncake::sync;
use mooncake::{Batch, Error, TransferState};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// How often an interruptible wait looks for a pending signal (Python runs signal handlers, raising
/// `KeyboardInterrupt` for Ctrl-C, only when asked on the main thread).
pub const SIGNAL_CHECK: Duration = Duration::from_millis(50);

/// Runs `f` on a helper thread with the GIL released, checking for signals between waits. On a signal the
/// handler's exception (`KeyboardInterrupt`) is returned at once; `f` runs to its end in the background and
/// its result is dropped. For calls whose latency does not matter (set-up, shutdown).
pub fn run_interruptibly<T, F>(py: Python<'_>, what: &str, f: F) -> PyResult<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let slot: Arc<(Mutex<Option<std::thread::Result<T>>>, Condvar)> = Arc::new((Mutex::new(None), Condvar::new()));
    let filler = slot.clone();
    std::thread::Builder::new()
        .name(format!("mooncake-{what}"))
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            *sync::lock(&filler.0) = Some(result);
            filler.1.notify_all();
        })
        .map_err(|e| PyRuntimeError::new_err(format!("{what}: cannot start a thread: {e}")))?;
    loop {
        let taken = py.detach(|| {
            let (lock, cv) = &*slot;
            let guard = sync::lock(lock);
            let (mut guard, _) =
                cv.wait_timeout_while(guard, SIGNAL_CHECK, |v| v.is_none()).unwrap_or_else(|p| p.into_inner());
            guard.take()
        });
        match taken {
            Some(Ok(v)) => return Ok(v),
            Some(Err(_)) => return Err(PyRuntimeError::new_err(format!("{what}: the call panicked (see stderr)"))),
            None => py.check_signals()?,
        }
    }
}

/// Waits for `batch` with the GIL released for at most `timeout`, in slices. `Ok(true)`: every request is
/// final; `Ok(false)`: the time ran out (the caller decides what that means). A signal cancels the batch's
/// unfinished requests and returns the handler's exception.
pub fn wait_batch(py: Python<'_>, batch: &Arc<Batch>, timeout: Duration) -> PyResult<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(batch.is_done());
        }
        let slice = left.min(SIGNAL_CHECK);
        if py.detach(|| batch.wait_done_for(slice)) {
            return Ok(true);
        }
        if let Err(e) = py.check_signals() {
            batch.abort(TransferState::Canceled, Error::Canceled);
            return Err(e);
        }
    }
}
