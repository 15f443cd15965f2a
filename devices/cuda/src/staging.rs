//! Host staging for copies between GPU memory and pageable host memory.
//!
//! A copy from or to pageable memory (an ordinary `Vec`) cannot be DMA'd directly: the driver
//! stages it through its own small pinned buffers, far below PCIe speed for large copies. Large
//! copies therefore go through two pinned bounce buffers of a [`Lane`] in [`CHUNK`]-byte chunks,
//! two chunks in flight: while the GPU fills (or drains) one buffer, the CPU drains (or fills) the
//! other. The schedule ([`download`], [`upload`]) is written against the [`Pipe`] trait so that it
//! is tested here with a simulated asynchronous engine; [`LanePipe`] drives the real one.

use std::sync::Mutex;

use cudarc::driver::sys;
use mooncake_core::sync;

use crate::driver::{CudaError, Driver};

/// Bytes per staged chunk (each lane holds two pinned buffers of this size).
pub const CHUNK: usize = 4 << 20;

/// Copies up to this many bytes go straight to the driver (its own staging is fast enough there).
pub const DIRECT_MAX: usize = 1 << 20;

/// Idle lanes kept per device; more are destroyed when returned.
const MAX_IDLE_LANES: usize = 4;

/// What a chunked copy needs from the copy engine. Slots are the two bounce buffers; operations
/// queued on a slot run in order with all others (one stream), asynchronously to the CPU.
pub(crate) trait Pipe {
    /// Queues device bytes `[off, off+n)` (relative to the copy's device start) into bounce buffer
    /// `slot`, and marks the slot busy until [`Pipe::wait`].
    fn fetch(&mut self, slot: usize, off: u64, n: usize) -> Result<(), CudaError>;
    /// Queues the first `n` bytes of bounce buffer `slot` to device bytes `[off, off+n)`.
    fn store(&mut self, slot: usize, off: u64, n: usize) -> Result<(), CudaError>;
    /// Waits until everything queued on `slot` so far has completed.
    fn wait(&mut self, slot: usize) -> Result<(), CudaError>;
    /// Bounce buffer `slot` (at least [`CHUNK`] bytes); only touched after [`Pipe::wait`] on it.
    fn bounce(&mut self, slot: usize) -> &mut [u8];
    /// Waits until everything queued has completed.
    fn finish(&mut self) -> Result<(), CudaError>;
}

/// The chunk `i` of a `len`-byte copy: offset and length.
fn span(i: usize, len: usize, chunk: usize) -> (usize, usize) {
    let off = i * chunk;
    (off, chunk.min(len - off))
}

/// Device to host: fills `dst` from device bytes `[0, dst.len())`, two chunks in flight.
pub(crate) fn download(p: &mut impl Pipe, dst: &mut [u8], chunk: usize) -> Result<(), CudaError> {
    let len = dst.len();
    let chunks = len.div_ceil(chunk);
    for i in 0..chunks.min(2) {
        let (off, n) = span(i, len, chunk);
        p.fetch(i % 2, off as u64, n)?;
    }
    for i in 0..chunks {
        let slot = i % 2;
        let (off, n) = span(i, len, chunk);
        p.wait(slot)?;
        dst[off..off + n].copy_from_slice(&p.bounce(slot)[..n]);
        if i + 2 < chunks {
            let (next, m) = span(i + 2, len, chunk);
            p.fetch(slot, next as u64, m)?;
        }
    }
    Ok(())
}

/// Host to device: writes `src` to device bytes `[0, src.len())`, two chunks in flight; returns
/// when every byte has landed.
pub(crate) fn upload(p: &mut impl Pipe, src: &[u8], chunk: usize) -> Result<(), CudaError> {
    let len = src.len();
    for i in 0..len.div_ceil(chunk) {
        let slot = i % 2;
        let (off, n) = span(i, len, chunk);
        if i >= 2 {
            p.wait(slot)?;
        }
        p.bounce(slot)[..n].copy_from_slice(&src[off..off + n]);
        p.store(slot, off as u64, n)?;
    }
    p.finish()
}

/// A pinned host buffer from `cuMemHostAlloc`.
#[derive(Debug)]
struct Pinned {
    ptr: *mut u8,
    len: usize,
}

/// A stream, two events and (once needed) two pinned bounce buffers, all in one device's context.
#[derive(Debug)]
pub(crate) struct Lane {
    ordinal: u32,
    stream: sys::CUstream,
    events: [sys::CUevent; 2],
    bounce: Option<[Pinned; 2]>,
    /// False after an error left work of unknown state on the stream: the lane is then destroyed.
    healthy: bool,
}

// SAFETY: CUDA stream, event and pinned-memory handles may be used from any thread; a Lane is
// used by one thread at a time (taken out of the pool, returned after the copy).
unsafe impl Send for Lane {}

impl Lane {
    /// A new lane on device `ordinal` (its context must be current).
    fn new(driver: &Driver, ordinal: u32) -> Result<Lane, CudaError> {
        let stream = driver.stream_create()?;
        let mut lane = Lane { ordinal, stream, events: [std::ptr::null_mut(); 2], bounce: None, healthy: true };
        lane.events[0] = driver.event_create()?;
        lane.events[1] = driver.event_create()?;
        Ok(lane)
    }

    /// The lane's stream.
    pub(crate) fn stream(&self) -> sys::CUstream {
        self.stream
    }

    /// Waits for everything on the stream; a failure marks the lane unusable.
    pub(crate) fn sync(&mut self, driver: &Driver) -> Result<(), CudaError> {
        let r = driver.stream_sync(self.stream);
        if r.is_err() {
            self.healthy = false;
        }
        r
    }

    /// Allocates the bounce buffers on first use.
    fn ensure_bounce(&mut self, driver: &Driver) -> Result<(), CudaError> {
        if self.bounce.is_none() {
            let a = Pinned { ptr: driver.host_alloc(CHUNK)?, len: CHUNK };
            let b = match driver.host_alloc(CHUNK) {
                Ok(p) => Pinned { ptr: p, len: CHUNK },
                Err(e) => {
                    // SAFETY: `a` was just allocated and never used by a copy.
                    if let Err(e) = unsafe { driver.host_free(a.ptr) } {
                        tracing::warn!(error = %e, "cuMemFreeHost of a bounce buffer failed");
                    }
                    return Err(e);
                }
            };
            self.bounce = Some([a, b]);
        }
        Ok(())
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        let Ok(driver) = Driver::get() else { return };
        let Ok(_current) = driver.enter(self.ordinal) else { return };
        // Nothing may still be writing a bounce buffer when it is freed.
        if let Err(e) = driver.stream_sync(self.stream) {
            tracing::warn!(error = %e, "stream of a dropped staging lane failed; leaking its buffers");
            return;
        }
        if let Some(bufs) = self.bounce.take() {
            for b in bufs {
                // SAFETY: the stream is idle (synchronized above), so no copy uses the buffer.
                if let Err(e) = unsafe { driver.host_free(b.ptr) } {
                    tracing::warn!(error = %e, "cuMemFreeHost failed");
                }
            }
        }
        for e in self.events {
            if !e.is_null() {
                // SAFETY: our event, idle (stream synchronized), destroyed once.
                let _ = unsafe { driver.event_destroy(e) };
            }
        }
        // SAFETY: our stream, idle, destroyed once.
        let _ = unsafe { driver.stream_destroy(self.stream) };
    }
}

/// Idle lanes of every device.
#[derive(Debug)]
pub(crate) struct Lanes {
    idle: Vec<Mutex<Vec<Lane>>>,
}

impl Lanes {
    /// An empty pool for `devices` GPUs.
    pub(crate) fn new(devices: u32) -> Lanes {
        Lanes { idle: (0..devices).map(|_| Mutex::new(Vec::new())).collect() }
    }

    /// An idle lane of device `ordinal`, or a new one (its context must be current).
    pub(crate) fn take(&self, driver: &Driver, ordinal: u32) -> Result<Lane, CudaError> {
        if let Some(lane) = self.idle.get(ordinal as usize).and_then(|m| sync::lock(m).pop()) {
            return Ok(lane);
        }
        Lane::new(driver, ordinal)
    }

    /// Returns a lane to the pool (a broken one, or one too many, is destroyed).
    pub(crate) fn give(&self, lane: Lane) {
        if !lane.healthy {
            return;
        }
        if let Some(m) = self.idle.get(lane.ordinal as usize) {
            let mut idle = sync::lock(m);
            if idle.len() < MAX_IDLE_LANES {
                idle.push(lane);
            }
        }
    }
}

/// [`Pipe`] over a real lane: chunks move between the bounce buffers and device memory at `dev`.
pub(crate) struct LanePipe<'a> {
    driver: &'a Driver,
    lane: &'a mut Lane,
    dev: u64,
}

impl<'a> LanePipe<'a> {
    /// A pipe for a copy whose device side starts at `dev` (the lane's context must be current
    /// and `dev` device memory valid for the whole copy).
    pub(crate) fn new(driver: &'a Driver, lane: &'a mut Lane, dev: u64) -> Result<LanePipe<'a>, CudaError> {
        lane.ensure_bounce(driver)?;
        Ok(LanePipe { driver, lane, dev })
    }

    fn buffer(&self, slot: usize) -> &Pinned {
        // ensure_bounce ran in new().
        &self.lane.bounce.as_ref().expect("bounce buffers allocated in LanePipe::new")[slot]
    }
}

impl Pipe for LanePipe<'_> {
    fn fetch(&mut self, slot: usize, off: u64, n: usize) -> Result<(), CudaError> {
        let buf = self.buffer(slot).ptr;
        debug_assert!(n <= CHUNK);
        // SAFETY: the bounce buffer holds CHUNK >= n bytes and is not touched by the CPU until
        // wait(slot) (the schedule of download/upload, tested with SimPipe); the device range lies
        // inside the copy's checked allocation.
        unsafe { self.driver.dtoh_async(buf, self.dev + off, n, self.lane.stream) }?;
        self.driver.event_record(self.lane.events[slot], self.lane.stream)
    }

    fn store(&mut self, slot: usize, off: u64, n: usize) -> Result<(), CudaError> {
        let buf = self.buffer(slot).ptr;
        debug_assert!(n <= CHUNK);
        // SAFETY: as in fetch: the buffer stays unchanged until wait(slot); the device range lies
        // inside the copy's checked allocation.
        unsafe { self.driver.htod_async(self.dev + off, buf, n, self.lane.stream) }?;
        self.driver.event_record(self.lane.events[slot], self.lane.stream)
    }

    fn wait(&mut self, slot: usize) -> Result<(), CudaError> {
        let r = self.driver.event_sync(self.lane.events[slot]);
        if r.is_err() {
            self.lane.healthy = false;
        }
        r
    }

    fn bounce(&mut self, slot: usize) -> &mut [u8] {
        let b = self.buffer(slot);
        // SAFETY: a live pinned allocation of `len` bytes owned by the lane, which this pipe
        // borrows mutably; the schedule only asks for it after wait(slot), so no DMA touches it.
        unsafe { std::slice::from_raw_parts_mut(b.ptr, b.len) }
    }

    fn finish(&mut self) -> Result<(), CudaError> {
        self.lane.sync(self.driver)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A simulated asynchronous copy engine: queued operations run only when waited for (in
    /// stream order), and touching a bounce buffer with an operation pending on it panics.
    pub(crate) struct SimPipe {
        pub device: Vec<u8>,
        bounce: [Vec<u8>; 2],
        queue: VecDeque<(usize, bool, u64, usize)>,
        pub max_in_flight: usize,
        pub fail_at: Option<usize>,
        ops: usize,
    }

    impl SimPipe {
        pub(crate) fn new(device: Vec<u8>, chunk: usize) -> Self {
            SimPipe {
                device,
                bounce: [vec![0; chunk], vec![0; chunk]],
                queue: VecDeque::new(),
                max_in_flight: 0,
                fail_at: None,
                ops: 0,
            }
        }

        fn queue(&mut self, op: (usize, bool, u64, usize)) -> Result<(), CudaError> {
            self.ops += 1;
            if self.fail_at == Some(self.ops) {
                return Err(CudaError::Call {
                    call: "cuMemcpyAsync",
                    code: 700,
                    name: "CUDA_ERROR_ILLEGAL_ADDRESS".into(),
                });
            }
            self.queue.push_back(op);
            self.max_in_flight = self.max_in_flight.max(self.queue.len());
            Ok(())
        }

        fn run_until(&mut self, slot: Option<usize>) {
            let last = match slot {
                Some(s) => self.queue.iter().rposition(|op| op.0 == s),
                None => self.queue.len().checked_sub(1),
            };
            let Some(last) = last else { return };
            for _ in 0..=last {
                let (slot, fetch, off, n) = self.queue.pop_front().unwrap();
                let dev = &mut self.device[off as usize..off as usize + n];
                if fetch {
                    self.bounce[slot][..n].copy_from_slice(dev);
                } else {
                    dev.copy_from_slice(&self.bounce[slot][..n]);
                }
            }
        }
    }

    impl Pipe for SimPipe {
        fn fetch(&mut self, slot: usize, off: u64, n: usize) -> Result<(), CudaError> {
            self.queue((slot, true, off, n))
        }
        fn store(&mut self, slot: usize, off: u64, n: usize) -> Result<(), CudaError> {
            self.queue((slot, false, off, n))
        }
        fn wait(&mut self, slot: usize) -> Result<(), CudaError> {
            self.run_until(Some(slot));
            Ok(())
        }
        fn bounce(&mut self, slot: usize) -> &mut [u8] {
            assert!(!self.queue.iter().any(|op| op.0 == slot), "CPU touched bounce buffer {slot} with a copy pending");
            &mut self.bounce[slot]
        }
        fn finish(&mut self) -> Result<(), CudaError> {
            self.run_until(None);
            Ok(())
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn downloads_move_every_byte_with_two_chunks_in_flight() {
        for (len, chunk) in [(1, 4), (4, 4), (5, 4), (8, 4), (9, 4), (1000, 64), (4096 + 3, 512)] {
            let device = pattern(len, 7);
            let mut p = SimPipe::new(device.clone(), chunk);
            let mut dst = vec![0u8; len];
            download(&mut p, &mut dst, chunk).unwrap();
            assert_eq!(dst, device, "len {len} chunk {chunk}");
            assert!(p.queue.is_empty());
            assert!(p.max_in_flight <= 2);
            if len > chunk {
                assert_eq!(p.max_in_flight, 2, "len {len}: two chunks overlap");
            }
        }
    }

    #[test]
    fn uploads_land_every_byte_before_returning() {
        for (len, chunk) in [(1, 4), (4, 4), (5, 4), (12, 4), (1000, 64), (4096 + 3, 512)] {
            let src = pattern(len, 3);
            let mut p = SimPipe::new(vec![0; len], chunk);
            upload(&mut p, &src, chunk).unwrap();
            assert!(p.queue.is_empty(), "finish waited for the last chunks");
            assert_eq!(p.device, src, "len {len} chunk {chunk}");
            assert!(p.max_in_flight <= 2);
        }
    }

    #[test]
    fn a_failed_chunk_stops_the_copy_with_the_driver_error() {
        let mut p = SimPipe::new(pattern(100, 1), 10);
        p.fail_at = Some(4);
        let mut dst = vec![0u8; 100];
        let e = download(&mut p, &mut dst, 10).unwrap_err();
        assert_eq!(e.error_name(), Some("CUDA_ERROR_ILLEGAL_ADDRESS"));
        let mut p = SimPipe::new(vec![0; 100], 10);
        p.fail_at = Some(2);
        assert!(upload(&mut p, &pattern(100, 2), 10).is_err());
    }
}
