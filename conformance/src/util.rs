//! Small helpers shared by the suites: error context, buffers with known patterns, bounded waits.

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

/// Turns errors and `None` into a failure message naming what was being done.
pub(crate) trait OrFail<T> {
    fn or_fail(self, what: &str) -> Result<T, String>;
}

impl<T, E: Display> OrFail<T> for Result<T, E> {
    fn or_fail(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

impl<T> OrFail<T> for Option<T> {
    fn or_fail(self, what: &str) -> Result<T, String> {
        self.ok_or_else(|| format!("{what}: nothing returned"))
    }
}

/// Fails with `msg` unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}
pub(crate) use ensure;

/// Byte `i` of the test pattern number `seed` (not periodic at small powers of two).
pub fn pattern_byte(seed: u64, i: u64) -> u8 {
    let x = (i ^ (i >> 7) ^ (i >> 17)).wrapping_mul(0x9E37_79B9).wrapping_add(seed.wrapping_mul(0x85EB_CA6B));
    (x >> 11) as u8
}

/// `len` bytes of pattern `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern_byte(seed, i)).collect()
}

/// Compares `got` with pattern `seed` starting at pattern index `start`; names the first mismatch.
pub(crate) fn check_pattern(got: &[u8], seed: u64, start: u64, what: &str) -> Result<(), String> {
    match got.iter().enumerate().find(|(i, b)| **b != pattern_byte(seed, start + *i as u64)) {
        None => Ok(()),
        Some((i, b)) => Err(format!(
            "{what}: byte {i} of {} is {b:#04x}, expected {:#04x}",
            got.len(),
            pattern_byte(seed, start + i as u64)
        )),
    }
}

/// Compares two slices; names the first mismatch.
pub(crate) fn check_equal(got: &[u8], want: &[u8], what: &str) -> Result<(), String> {
    ensure!(got.len() == want.len(), "{what}: {} bytes, expected {}", got.len(), want.len());
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(format!("{what}: byte {i} of {} is {:#04x}, expected {:#04x}", got.len(), got[i], want[i])),
    }
}

/// A heap buffer whose address is handed to engines, registered without `unsafe`: the engine holds the
/// memory while it is registered ([`HostBuf::owned`]). The test reads and writes it by copy, and only while no
/// transfer into it is in flight.
pub(crate) struct HostBuf {
    mem: mooncake_raw::HostBuffer,
}

impl HostBuf {
    /// `len` zero bytes (at least 1).
    pub(crate) fn zeroed(len: usize) -> Self {
        HostBuf { mem: mooncake_raw::HostBuffer::zeroed(len) }
    }

    /// `len` bytes of pattern `seed`.
    pub(crate) fn with_pattern(seed: u64, len: usize) -> Self {
        HostBuf { mem: mooncake_raw::HostBuffer::from_vec(pattern(seed, len.max(1))) }
    }

    pub(crate) fn addr(&self) -> u64 {
        self.mem.addr()
    }

    pub(crate) fn len(&self) -> u64 {
        self.mem.len()
    }

    /// A copy of the bytes.
    pub(crate) fn bytes(&self) -> Vec<u8> {
        self.mem.to_vec()
    }

    /// Copies `dst.len()` bytes at `offset` into `dst`.
    pub(crate) fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), String> {
        self.mem.read(offset, dst).or_fail("reading the test buffer")
    }

    /// Copies `data` into the buffer at `offset` (panics past the end: a bug in the suite).
    pub(crate) fn write(&self, offset: u64, data: &[u8]) {
        self.mem.write(offset, data).expect("write inside the test buffer");
    }

    /// The memory, for `TransferEngine::register_owned`.
    pub(crate) fn owned(&self) -> mooncake_core::OwnedMemory {
        self.mem.owned()
    }
}

/// A fresh single-threaded tokio runtime for one test.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().or_fail("building a tokio runtime")
}

/// Runs `fut` on a fresh runtime; `Err` when it does not finish within `limit` (a hang).
pub(crate) fn block_on_timeout<F: Future>(limit: Duration, what: &str, fut: F) -> Result<F::Output, String> {
    let rt = runtime()?;
    rt.block_on(async { tokio::time::timeout(limit, fut).await })
        .map_err(|_| format!("{what}: did not finish within {limit:?} (hang)"))
}

/// Wakes a parked thread.
struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Drives `fut` on the calling thread with no async runtime at all (checks runtime-agnostic APIs);
/// `Err` when it is not ready within `limit`.
pub(crate) fn block_on_plain<F: Future>(limit: Duration, what: &str, fut: F) -> Result<F::Output, String> {
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    let deadline = Instant::now() + limit;
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return Ok(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(format!("{what}: not ready within {limit:?} without a tokio runtime (hang)"));
        }
        std::thread::park_timeout((deadline - now).min(Duration::from_millis(100)));
    }
}

/// Polls `cond` every millisecond until it holds or `limit` passes.
pub(crate) fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `1B`, `4KiB`, `64MiB`.
pub(crate) fn human(n: u64) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{}MiB", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{}KiB", n >> 10)
    } else {
        format!("{n}B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_by_seed_and_position() {
        let a = pattern(1, 4096);
        assert_ne!(a, pattern(2, 4096));
        assert_ne!(a[..256], a[256..512]);
        assert!(check_pattern(&a[100..200], 1, 100, "x").is_ok());
        assert!(check_pattern(&a[100..200], 1, 101, "x").is_err());
        assert_eq!(human(4096), "4KiB");
        assert_eq!(human(7), "7B");
        assert_eq!(human(64 << 20), "64MiB");
    }

    #[test]
    fn plain_block_on_drives_wakeups() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            let _ = tx.send(5);
        });
        assert_eq!(block_on_plain(Duration::from_secs(10), "x", rx).unwrap().unwrap(), 5);
        let never = std::future::pending::<()>();
        assert!(block_on_plain(Duration::from_millis(20), "x", never).is_err());
    }
}
