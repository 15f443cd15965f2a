//! The I/O layer: files opened on demand, and I/O threads that each own an io_uring.
//!
//! A request is cut (by the transport) into per-file slices and those into operations of at most `max_io`
//! bytes whose file offsets fall on 4 KiB boundaries, except for a slice's unaligned head and tail (each less
//! than a block). Each operation runs one of three ways:
//!
//! - **direct, in place**: O_DIRECT on the caller's host memory, when its address, the file offset and the
//!   length are all multiples of the file's block size (a block device's logical block size, 4 KiB for files);
//! - **direct, bounced**: O_DIRECT through an aligned bounce buffer (registered with the ring as a fixed buffer)
//!   when the caller's memory is unaligned or device memory, and for unaligned reads (the covering blocks are
//!   read, the requested bytes copied out);
//! - **buffered**: through the page cache, for files whose file system refuses O_DIRECT (tmpfs), with
//!   `MC_NVMEOF_DIRECT=0`, and for unaligned writes: writing a partial block with O_DIRECT needs a
//!   read-modify-write of the whole block, which would race with concurrent writes of its other bytes.
//!
//! Files are registered with the ring as fixed files. Device (GPU) memory is staged through its device on the
//! I/O thread (cuFile, when loaded, takes CUDA memory first: see `cufile`).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, squeue, types};
use mooncake_core::{Error, LocalRange, MemoryKind, Opcode, PeerEvents, PieceDone, RegionGuard, Result, sync};
use mooncake_raw::Span;

use crate::error::{FileError, FileErrorKind};

/// Block size used for regular files (a multiple of every logical block size in use).
pub const FILE_ALIGN: u64 = 4096;
/// Fixed-file slots each ring registers.
const FILE_SLOTS: u32 = 256;
/// Fixed-buffer slots each ring keeps for registered memory, after its bounce buffers' slots.
const REGION_SLOTS: u32 = 1024;
/// Largest fixed buffer (the kernel refuses more than 1 GiB): registered memory is registered in chunks.
const FIXED_CHUNK: u64 = 1 << 30;

/// The size of the file or block device at `path`.
pub fn file_size(path: &Path) -> Result<u64> {
    let f = File::open(path).map_err(|e| os_err(path, &e, "open").into_error())?;
    let meta = f.metadata().map_err(|e| os_err(path, &e, "stat").into_error())?;
    if meta.file_type().is_block_device() {
        let mut size = 0u64;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a local u64.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if r != 0 {
            return Err(os_err(path, &std::io::Error::last_os_error(), "BLKGETSIZE64").into_error());
        }
        return Ok(size);
    }
    Ok(meta.len())
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

fn os_err(path: &Path, e: &std::io::Error, what: &str) -> FileError {
    match e.raw_os_error() {
        Some(errno) => FileError::os(path, errno, what),
        None => FileError::new(path, FileErrorKind::Other, format!("{what}: {e}")),
    }
}

/// How a file is read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// O_DIRECT (aligned operations bypass the page cache; see the module docs for the rest).
    Direct,
    /// Through the page cache: the file system refused O_DIRECT (tmpfs), or `MC_NVMEOF_DIRECT=0`.
    Buffered,
}

static OPENED: Mutex<Option<HashMap<PathBuf, IoMode>>> = Mutex::new(None);

/// How this process last opened the file at `path` (as a segment's file resolved on this host), if it did.
pub fn io_mode(path: &Path) -> Option<IoMode> {
    sync::lock(&OPENED).as_ref().and_then(|m| m.get(path).copied())
}

/// An open file of a segment: a buffered descriptor, and an O_DIRECT one where the file system allows it.
#[derive(Debug)]
pub struct OpenFile {
    id: u64,
    path: PathBuf,
    buffered: File,
    direct: Option<File>,
    writable: bool,
    align: u64,
}

impl OpenFile {
    fn open(path: &Path, want_direct: bool) -> std::result::Result<OpenFile, FileError> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let opts = |write: bool, direct: bool| {
            let mut o = std::fs::OpenOptions::new();
            o.read(true).write(write).custom_flags(if direct { libc::O_DIRECT } else { 0 });
            o
        };
        let (buffered, writable) = match opts(true, false).open(path) {
            Ok(f) => (f, true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM | libc::EROFS | libc::ETXTBSY)) => {
                // Readable perhaps: reads work, writes fail with ReadOnly.
                match opts(false, false).open(path) {
                    Ok(f) => (f, false),
                    Err(_) => return Err(os_err(path, &e, "open")),
                }
            }
            Err(e) => return Err(os_err(path, &e, "open")),
        };
        let meta = buffered.metadata().map_err(|e| os_err(path, &e, "stat"))?;
        let block = meta.file_type().is_block_device();
        if !block && !meta.file_type().is_file() {
            return Err(FileError::new(path, FileErrorKind::Other, "not a regular file or block device"));
        }
        let mut align = FILE_ALIGN;
        if block {
            let mut sz: libc::c_int = 0;
            // SAFETY: BLKSSZGET writes one int through the pointer, which points at a local int.
            if unsafe { libc::ioctl(buffered.as_raw_fd(), BLKSSZGET, &mut sz as *mut libc::c_int) } == 0 && sz > 0 {
                align = sz as u64;
            }
        }
        let direct = if want_direct {
            match opts(writable, true).open(path) {
                Ok(f) => Some(f),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!(path = %path.display(), "nvmeof: O_DIRECT refused (e.g. tmpfs); using buffered I/O");
                    None
                }
                Err(e) => return Err(os_err(path, &e, "open with O_DIRECT")),
            }
        } else {
            None
        };
        sync::lock(&OPENED)
            .get_or_insert_with(HashMap::new)
            .insert(path.to_path_buf(), if direct.is_some() { IoMode::Direct } else { IoMode::Buffered });
        Ok(OpenFile {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            path: path.to_path_buf(),
            buffered,
            direct,
            writable,
            align,
        })
    }

    /// Whether reads and writes bypass the page cache (O_DIRECT).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The path it was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether it was opened for writing.
    pub(crate) fn is_writable(&self) -> bool {
        self.writable
    }

    /// Its block size: O_DIRECT offsets, lengths and memory must be multiples of it.
    pub(crate) fn align(&self) -> u64 {
        self.align
    }

    /// The descriptor: the O_DIRECT one when asked for and there is one.
    pub(crate) fn raw_fd(&self, direct: bool) -> i32 {
        self.fd(direct)
    }

    fn fd(&self, direct: bool) -> i32 {
        match (&self.direct, direct) {
            (Some(d), true) => d.as_raw_fd(),
            _ => self.buffered.as_raw_fd(),
        }
    }

    fn size(&self) -> Option<u64> {
        self.buffered.metadata().ok().map(|m| m.len())
    }

    /// Whether the (regular) file was removed since it was opened: one `fstat`.
    fn unlinked(&self) -> bool {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat writes one `struct stat` through the pointer, which points at a local of that type.
        if unsafe { libc::fstat(self.buffered.as_raw_fd(), st.as_mut_ptr()) } != 0 {
            return false;
        }
        // SAFETY: fstat succeeded, so it filled the struct.
        let st = unsafe { st.assume_init() };
        st.st_nlink == 0 && st.st_mode & libc::S_IFMT == libc::S_IFREG
    }
}

/// One file of one segment as this host resolves it, opened on first use.
pub struct FileEntry {
    /// Resolved path.
    pub path: PathBuf,
    /// Bytes the segment publishes for it.
    pub published: u64,
    want_direct: bool,
    open: Mutex<Option<Arc<OpenFile>>>,
    /// Told when the file cannot be found: the segment's descriptor may be stale.
    missing: Option<(Arc<dyn PeerEvents>, String)>,
}

impl std::fmt::Debug for FileEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileEntry").field("path", &self.path).field("published", &self.published).finish()
    }
}

impl FileEntry {
    /// An entry for `path` (nothing is opened yet); a missing file is reported to `missing` (the engine's
    /// events, and the segment's name).
    pub fn new(
        path: PathBuf,
        published: u64,
        want_direct: bool,
        missing: Option<(Arc<dyn PeerEvents>, String)>,
    ) -> Self {
        FileEntry { path, published, want_direct, open: Mutex::new(None), missing }
    }

    pub(crate) fn report_missing(&self) {
        if let Some((events, segment)) = &self.missing {
            events.peer_failed(segment);
        }
    }

    /// The open file, opening it on first use.
    pub fn get(&self) -> std::result::Result<Arc<OpenFile>, FileError> {
        let mut g = sync::lock(&self.open);
        if let Some(f) = g.as_ref() {
            return Ok(f.clone());
        }
        let f = Arc::new(OpenFile::open(&self.path, self.want_direct)?);
        *g = Some(f.clone());
        Ok(f)
    }

    /// Forgets the open file if it was removed since it was opened (one `fstat`), so that the next
    /// [`FileEntry::get`] opens the path again (which then fails with `NotFound`, or finds the file that replaced
    /// it). The transport calls it on the submitting thread before the first operation of each submission on
    /// the file, which keeps the check off the I/O thread.
    pub fn forget_if_unlinked(&self) {
        let mut g = sync::lock(&self.open);
        if g.as_ref().is_some_and(|f| f.unlinked()) {
            *g = None;
        }
    }

    /// The open file, if it was opened.
    pub fn opened(&self) -> Option<Arc<OpenFile>> {
        sync::lock(&self.open).clone()
    }
}

/// One operation: `len` bytes at `file_off` of `file`, to or from `local`.
#[derive(Debug)]
pub struct Op {
    /// The file.
    pub file: Arc<FileEntry>,
    /// Offset in the file.
    pub file_off: u64,
    /// Read (file into local) or write.
    pub opcode: Opcode,
    /// The local bytes, with their proof (held until the operation is finished).
    pub local: LocalRange,
    /// Where the outcome goes.
    pub done: Option<PieceDone>,
}

impl Op {
    fn len(&self) -> u64 {
        self.local.len()
    }

    fn finish(&mut self, r: Result<u64>) {
        if let Some(d) = self.done.take() {
            d.finish(r);
        }
    }

    fn what(&self) -> String {
        let op = if self.opcode == Opcode::Read { "read" } else { "write" };
        format!("{op} of {} bytes at offset {}", self.len(), self.file_off)
    }
}

/// Cuts `[off, off+len)` of a file into operations: an unaligned head up to the next [`FILE_ALIGN`] boundary,
/// aligned pieces of at most `max_io` bytes, an unaligned tail. Returns `(offset from off, length)` pairs.
pub fn cut(off: u64, len: u64, max_io: u64) -> Vec<(u64, u64)> {
    let a = FILE_ALIGN;
    let max_io = (max_io / a).max(1) * a;
    let end = off + len;
    let mut out = Vec::with_capacity((len / max_io) as usize + 2);
    let mut cur = off;
    if cur % a != 0 {
        let head_end = (cur.div_ceil(a) * a).min(end);
        out.push((0, head_end - cur));
        cur = head_end;
    }
    let body_end = (end / a * a).max(cur);
    while cur < body_end {
        let n = max_io.min(body_end - cur);
        out.push((cur - off, n));
        cur += n;
    }
    if cur < end {
        out.push((cur - off, end - cur));
    }
    out
}

// ---- test hook ---------------------------------------------------------------------------------

/// **Test-only** fault injection (documented in docs/nvmeof.md): makes every read and write of a file fail
/// with an OS error, as a failing device would, without root-only kernel features. Nothing in the
/// transport sets it; production code pays one relaxed atomic load per operation.
pub mod testing {
    use super::*;

    pub(super) static ACTIVE: AtomicBool = AtomicBool::new(false);
    static FAULTS: Mutex<Vec<(PathBuf, i32)>> = Mutex::new(Vec::new());

    /// Every later read and write of the file at `path` (as the transport resolved it) fails with `errno`
    /// (e.g. `libc::EIO`) until [`clear_errno`].
    pub fn inject_errno(path: &Path, errno: i32) {
        let mut f = sync::lock(&FAULTS);
        f.retain(|(p, _)| p != path);
        f.push((path.to_path_buf(), errno));
        ACTIVE.store(true, Ordering::Release);
    }

    /// Stops injecting errors for `path`.
    pub fn clear_errno(path: &Path) {
        let mut f = sync::lock(&FAULTS);
        f.retain(|(p, _)| p != path);
        ACTIVE.store(!f.is_empty(), Ordering::Release);
    }

    pub(crate) fn injected(path: &Path) -> Option<i32> {
        if !ACTIVE.load(Ordering::Relaxed) {
            return None;
        }
        sync::lock(&FAULTS).iter().find(|(p, _)| p == path).map(|(_, e)| *e)
    }
}

// ---- the I/O threads ----------------------------------------------------------------------------

/// Settings of the I/O layer.
#[derive(Debug, Clone, Copy)]
pub struct IoConfig {
    /// Operations in flight per ring.
    pub queue_depth: usize,
    /// Largest operation (a multiple of 4 KiB).
    pub max_io: u64,
    /// I/O threads (one ring each).
    pub threads: usize,
    /// Most submission entries handed to the kernel per `io_uring_enter` (1: each operation as soon as it is
    /// prepared).
    pub submit_batch: usize,
    /// How long an I/O thread that just reported an outcome keeps looking for new work before it sleeps.
    pub linger: Duration,
    /// Register the engine's host memory with the rings as fixed buffers (see [`FixedRegions`]).
    pub fixed_buffers: bool,
}

/// The engine's registered host memory, which each ring registers with the kernel as fixed buffers, a
/// 1 GiB chunk at a time, the first time an operation moves bytes in place from or to that chunk: the
/// kernel then skips pinning the pages of every operation (`ReadFixed`/`WriteFixed`). Those pages stay pinned
/// while the memory is registered, as RDMA registration pins them. Memory that cannot be registered (a
/// locked-memory limit, a kernel without sparse buffer tables) is read and written as before.
#[derive(Debug, Default)]
pub struct FixedRegions {
    /// Bumped on every change, so rings notice removals.
    generation: AtomicU64,
    next_id: AtomicU64,
    /// By start address: a registration's id and the region (held until it is unregistered, as the
    /// `Transport::register_memory` contract allows).
    regions: Mutex<HashMap<u64, (u64, RegionGuard)>>,
}

impl FixedRegions {
    fn add(&self, region: &RegionGuard) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        sync::lock(&self.regions).insert(region.addr, (id, region.clone()));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn remove(&self, addr: u64) -> bool {
        let removed = sync::lock(&self.regions).remove(&addr).is_some();
        if removed {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        removed
    }
}

struct Shared {
    queue: Mutex<VecDeque<Op>>,
    ready: Condvar,
    /// The thread sleeps on `ready` (nothing in flight).
    sleeping: AtomicBool,
    /// The thread waits in the kernel for completions: a push wakes it through `wake` (an eventfd the ring
    /// keeps a read pending on), so new operations do not wait for the next completion.
    in_kernel: AtomicBool,
    wake: std::os::fd::OwnedFd,
    stop: AtomicBool,
    queued: AtomicUsize,
    /// Operations done whose outcome is not reported yet: reporting one wakes its submitter, a system call
    /// when that is another thread. The I/O thread reports the first of a round of completions itself and
    /// leaves the rest here; the next submitter (often the one just woken) reports them from its own thread,
    /// where waking a task of its own runtime is cheap, while the I/O thread gets on with submitting. The I/O
    /// thread reports what is left whenever it has nothing to submit, so nothing waits on a submitter.
    finished: Mutex<Vec<(Op, Result<u64>)>>,
    finished_len: AtomicUsize,
}

impl Shared {
    /// Reports the outcomes left in `finished` (on the calling thread).
    fn report_finished(&self) {
        if self.finished_len.load(Ordering::Acquire) == 0 {
            return;
        }
        let done = std::mem::take(&mut *sync::lock(&self.finished));
        self.finished_len.fetch_sub(done.len(), Ordering::AcqRel);
        for (mut op, r) in done {
            op.finish(r);
        }
    }

    /// Reports one outcome left in `finished`; false when there was none.
    fn report_one(&self) -> bool {
        if self.finished_len.load(Ordering::Acquire) == 0 {
            return false;
        }
        let Some((mut op, r)) = sync::lock(&self.finished).pop() else { return false };
        self.finished_len.fetch_sub(1, Ordering::AcqRel);
        op.finish(r);
        true
    }

    fn kick(&self) {
        if self.sleeping.load(Ordering::Acquire) {
            self.ready.notify_one();
        } else if self.in_kernel.load(Ordering::SeqCst) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a local array to our eventfd.
            let _ = unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
    }
}

/// `user_data` of the eventfd read.
const WAKE: u64 = u64::MAX;

/// The I/O threads; operations are spread over them by submission.
pub struct IoPool {
    lanes: Vec<Arc<Shared>>,
    next: AtomicUsize,
    fixed: Option<Arc<FixedRegions>>,
}

impl std::fmt::Debug for IoPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoPool").field("lanes", &self.lanes.len()).finish()
    }
}

impl IoPool {
    /// Starts `config.threads` threads, each with a ring of `config.queue_depth` entries.
    pub fn start(config: IoConfig) -> Result<IoPool> {
        let mut lanes = Vec::new();
        let fixed = config.fixed_buffers.then(|| Arc::new(FixedRegions::default()));
        for i in 0..config.threads.max(1) {
            let ring = Ring::new(config, fixed.clone())?;
            // SAFETY: eventfd takes an initial value and flags; no memory is passed.
            let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if efd < 0 {
                return Err(Error::unavailable(format!("nvmeof: eventfd: {}", std::io::Error::last_os_error())));
            }
            // SAFETY: a descriptor eventfd just returned; we own it.
            let wake = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(efd) };
            let shared = Arc::new(Shared {
                queue: Mutex::new(VecDeque::new()),
                ready: Condvar::new(),
                sleeping: AtomicBool::new(false),
                in_kernel: AtomicBool::new(false),
                wake,
                stop: AtomicBool::new(false),
                queued: AtomicUsize::new(0),
                finished: Mutex::new(Vec::new()),
                finished_len: AtomicUsize::new(0),
            });
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("mooncake-nvmeof-{i}"))
                .spawn(move || ring.run(&s))
                .map_err(|e| Error::unavailable(format!("nvmeof: cannot start I/O thread {i}: {e}")))?;
            lanes.push(shared);
        }
        Ok(IoPool { lanes, next: AtomicUsize::new(0), fixed })
    }

    /// The engine registered `region`: host memory becomes a fixed buffer of each ring on first use.
    pub fn register_region(&self, region: &RegionGuard) {
        if let Some(fixed) = &self.fixed {
            if region.is_host() {
                fixed.add(region);
            }
        }
    }

    /// The engine unregisters the memory at `addr`: the rings drop its fixed buffers (unpinning its pages) at
    /// once; operations already submitted keep what they use until they complete.
    pub fn unregister_region(&self, addr: u64) {
        if self.fixed.as_ref().is_some_and(|f| f.remove(addr)) {
            for lane in &self.lanes {
                let _q = sync::lock(&lane.queue);
                lane.kick();
            }
        }
    }

    /// Queues the operations of one submission on one thread (they fail at once after [`IoPool::stop`]).
    pub fn push(&self, ops: Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        let lane = &self.lanes[self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len()];
        let mut q = sync::lock(&lane.queue);
        if lane.stop.load(Ordering::Acquire) {
            drop(q);
            for mut op in ops {
                op.finish(Err(stopped()));
            }
            return;
        }
        lane.queued.fetch_add(ops.len(), Ordering::SeqCst);
        q.extend(ops);
        drop(q);
        lane.kick();
        for lane in &self.lanes {
            lane.report_finished();
        }
    }

    /// Stops the threads: queued operations fail; those in flight finish first.
    pub fn stop(&self) {
        for lane in &self.lanes {
            let left: Vec<Op> = {
                let mut q = sync::lock(&lane.queue);
                lane.stop.store(true, Ordering::Release);
                q.drain(..).collect()
            };
            lane.ready.notify_all();
            for mut op in left {
                op.finish(Err(stopped()));
            }
        }
    }
}

fn stopped() -> Error {
    Error::NotInitialized("the nvmeof transport was shut down".into())
}

/// An aligned heap buffer for O_DIRECT staging.
struct Bounce {
    ptr: *mut u8,
    len: usize,
}

impl Bounce {
    fn layout(len: usize) -> std::alloc::Layout {
        // Both are valid: a non-zero size rounded to the page, and a power-of-two alignment.
        std::alloc::Layout::from_size_align(len.max(FILE_ALIGN as usize), FILE_ALIGN as usize)
            .unwrap_or(std::alloc::Layout::new::<u8>())
    }

    fn new(len: usize) -> Option<Bounce> {
        let layout = Bounce::layout(len);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(Bounce { ptr, len: layout.size() })
    }

    fn slice(&self, off: usize, len: usize) -> &[u8] {
        assert!(off + len <= self.len);
        // SAFETY: inside the allocation (checked); the ring is not writing into it while we read it (only
        // completed operations are copied out).
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) }
    }

    fn slice_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.len);
        // SAFETY: as above; no operation using the buffer is in flight while it is filled.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated by `Bounce::new` with this layout; the ring never uses it again (the ring drains
        // before the bounce buffers are dropped).
        unsafe { std::alloc::dealloc(self.ptr, Bounce::layout(self.len)) }
    }
}

/// One registered region as a ring sees it: its chunks of [`FIXED_CHUNK`] bytes are registered as fixed
/// buffers on first use, so only what file I/O touches gets pinned.
struct FixedRegion {
    /// The registration's id in [`FixedRegions`]; 0 for memory not registrable here (moved with plain reads
    /// and writes until the table changes).
    id: u64,
    len: u64,
    chunks: Vec<Chunk>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Untried,
    Slot(u16),
    /// The kernel refused it (a locked-memory limit): plain reads and writes until the table changes.
    Failed,
}

/// How an operation in flight moves its bytes.
#[derive(Debug, Clone, Copy)]
enum Way {
    /// Straight into or out of the caller's host memory at `addr` (inside fixed buffer `buf`, if any).
    InPlace { addr: u64, buf: Option<u16> },
    /// Through bounce buffer `index`; the file range `[io_off, io_off + io_len)` covers the operation.
    Bounce { index: usize },
}

struct InFlight {
    op: Op,
    file: Arc<OpenFile>,
    way: Way,
    direct: bool,
    io_off: u64,
    io_len: u64,
    /// Bytes done so far (resubmitted after a short transfer).
    progress: u64,
}

struct Ring {
    ring: IoUring,
    /// Target of the pending eventfd read (outlives the ring: dropped after it).
    wake_buf: Box<u64>,
    wake_armed: bool,
    qd: usize,
    max_io: u64,
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<usize>,
    bounce: Vec<Bounce>,
    free_bounce: Vec<usize>,
    fixed_bufs: bool,
    fixed_files: bool,
    files: HashMap<(u64, bool), (u32, Arc<OpenFile>)>,
    free_file_slots: Vec<u32>,
    pending: VecDeque<Op>,
    /// Entries pushed since the last `io_uring_enter`, and how many may wait for the next one.
    unsubmitted: usize,
    submit_batch: usize,
    /// Completions being handled (kept to reuse its allocation).
    cqes: Vec<(u64, i32)>,
    /// When this thread last reported an outcome, and how long it then waits for new work before sleeping.
    reported_at: Option<Instant>,
    linger: Duration,
    /// A sparse table of `qd + REGION_SLOTS` fixed buffers is registered: bounce buffers at `0..qd`, the
    /// engine's memory after them.
    buf_table: bool,
    fixed: Option<Arc<FixedRegions>>,
    fixed_seen: u64,
    /// Registered memory this ring has seen operations on, by start address.
    fixed_slots: HashMap<u64, FixedRegion>,
    free_buf_slots: Vec<u16>,
}

// SAFETY: the raw pointers (bounce buffers) are owned by the ring and only used by the one thread that owns it.
unsafe impl Send for Ring {}

impl Ring {
    fn new(config: IoConfig, fixed: Option<Arc<FixedRegions>>) -> Result<Ring> {
        let qd = config.queue_depth.clamp(1, 4096);
        let ring = IoUring::builder()
            .build((qd as u32 + 1).next_power_of_two())
            .map_err(|e| Error::unavailable(format!("nvmeof: io_uring_setup failed: {e}")))?;
        let fixed_files = ring.submitter().register_files_sparse(FILE_SLOTS).is_ok();
        let buf_table = ring.submitter().register_buffers_sparse(qd as u32 + REGION_SLOTS).is_ok();
        let fixed = fixed.filter(|_| buf_table);
        Ok(Ring {
            ring,
            wake_buf: Box::new(0),
            wake_armed: false,
            qd,
            max_io: config.max_io,
            slots: (0..qd).map(|_| None).collect(),
            free_slots: (0..qd).rev().collect(),
            bounce: Vec::new(),
            free_bounce: Vec::new(),
            fixed_bufs: false,
            fixed_files,
            files: HashMap::new(),
            free_file_slots: if fixed_files { (0..FILE_SLOTS).rev().collect() } else { Vec::new() },
            pending: VecDeque::new(),
            unsubmitted: 0,
            submit_batch: config.submit_batch.clamp(1, qd),
            cqes: Vec::with_capacity(qd + 1),
            reported_at: None,
            linger: config.linger,
            buf_table,
            free_buf_slots: if fixed.is_some() {
                (qd as u16..(qd as u32 + REGION_SLOTS) as u16).rev().collect()
            } else {
                Vec::new()
            },
            fixed,
            fixed_seen: 0,
            fixed_slots: HashMap::new(),
        })
    }

    fn inflight(&self) -> usize {
        self.qd - self.free_slots.len()
    }

    fn run(mut self, s: &Shared) {
        loop {
            let stop = s.stop.load(Ordering::Acquire);
            if s.queued.load(Ordering::Acquire) > 0 {
                let mut q = sync::lock(&s.queue);
                self.take(&mut q, s);
            }
            if stop {
                for mut op in self.pending.drain(..) {
                    op.finish(Err(stopped()));
                }
            }
            self.sync_fixed();
            self.prepare_pending();
            if s.queued.load(Ordering::Acquire) == 0 {
                if s.report_one() {
                    // Nothing to submit: report an outcome no submitter took, then look again.
                    self.reported_at = Some(Instant::now());
                    continue;
                }
                if !stop && self.linger(s) {
                    continue;
                }
            }
            if self.inflight() == 0 && self.pending.is_empty() {
                if stop {
                    break;
                }
                self.purge_files();
                self.sync_fixed();
                let mut q = sync::lock(&s.queue);
                while q.is_empty() && !s.stop.load(Ordering::Acquire) && !self.fixed_changed() {
                    s.sleeping.store(true, Ordering::Release);
                    q = sync::wait(&s.ready, q);
                    s.sleeping.store(false, Ordering::Release);
                }
                continue;
            }
            let mut want = usize::from(self.inflight() > 0);
            if want > 0 && !self.wake_armed {
                self.arm_wake(s);
            }
            s.in_kernel.store(want > 0, Ordering::SeqCst);
            if want > 0 && s.queued.load(Ordering::SeqCst) > 0 {
                want = 0;
            }
            let r = self.ring.submit_and_wait(want);
            s.in_kernel.store(false, Ordering::Release);
            if r.is_ok() {
                self.unsubmitted = 0;
            }
            match r {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => {}
                Err(e) => {
                    tracing::error!(error = %e, "nvmeof: io_uring submit failed; failing the operations in flight");
                    self.fail_inflight(&Error::unavailable(format!("nvmeof: io_uring_enter failed: {e}")));
                }
            }
            self.reap(s);
        }
    }

    /// Waits a little, without sleeping, for the operations a submitter is likely to queue right after an
    /// outcome reported to it (the usual way to keep a queue depth: a new request per finished one), or for a
    /// completion. Sleeping instead (in the kernel or on `ready`) and being woken costs tens of microseconds on
    /// a virtual machine, during which the device may run dry. True when something arrived.
    fn linger(&mut self, s: &Shared) -> bool {
        let Some(at) = self.reported_at.take() else { return false };
        let until = at + self.linger;
        loop {
            if s.queued.load(Ordering::Acquire) > 0 || !self.ring.completion().is_empty() {
                return true;
            }
            if s.stop.load(Ordering::Acquire) || Instant::now() >= until {
                return false;
            }
            for _ in 0..64 {
                std::hint::spin_loop();
            }
        }
    }

    /// Keeps a read of the wake eventfd pending, so a push ends the wait for completions.
    fn arm_wake(&mut self, s: &Shared) {
        let buf: *mut u64 = &mut *self.wake_buf;
        let sqe = opcode::Read::new(types::Fd(s.wake.as_raw_fd()), buf.cast(), 8).build().user_data(WAKE);
        // SAFETY: `wake_buf` lives as long as the ring (dropped after it) and the eventfd as long as `s`, which
        // outlives this thread's loop.
        self.wake_armed = unsafe { self.ring.submission().push(&sqe) }.is_ok();
    }

    fn take(&mut self, q: &mut VecDeque<Op>, s: &Shared) {
        let n = q.len();
        self.pending.extend(q.drain(..));
        s.queued.fetch_sub(n, Ordering::AcqRel);
    }

    fn fail_inflight(&mut self, e: &Error) {
        // The kernel may still touch the buffers of submitted entries: wait for them first.
        while self.inflight() > 0 {
            if self.ring.submit_and_wait(1).is_err() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let done: Vec<u64> = self.ring.completion().map(|c| c.user_data()).collect();
            for idx in done {
                if let Some(mut f) = self.slots.get_mut(idx as usize).and_then(Option::take) {
                    f.op.finish(Err(e.clone()));
                    self.release(idx as usize, &f);
                }
            }
        }
    }

    fn prepare_pending(&mut self) {
        while !self.free_slots.is_empty() {
            let Some(op) = self.pending.pop_front() else { break };
            if let Some(op) = self.prepare(op) {
                // Waits for a bounce buffer.
                self.pending.push_front(op);
                break;
            }
        }
    }

    fn fixed_changed(&self) -> bool {
        self.fixed.as_ref().is_some_and(|f| f.generation.load(Ordering::Acquire) != self.fixed_seen)
    }

    /// Drops the fixed buffers of memory the engine unregistered (and forgets what could not be registered,
    /// to try again).
    fn sync_fixed(&mut self) {
        let Some(fixed) = self.fixed.clone() else { return };
        let generation = fixed.generation.load(Ordering::Acquire);
        if generation == self.fixed_seen {
            return;
        }
        self.fixed_seen = generation;
        let stale: Vec<u64> = {
            let live = sync::lock(&fixed.regions);
            self.fixed_slots
                .iter()
                .filter(|(addr, r)| {
                    r.id == 0 || r.chunks.contains(&Chunk::Failed) || live.get(addr).is_none_or(|(id, _)| *id != r.id)
                })
                .map(|(addr, _)| *addr)
                .collect()
        };
        for addr in stale {
            if let Some(r) = self.fixed_slots.remove(&addr) {
                let slots: Vec<u16> =
                    r.chunks.iter().filter_map(|c| if let Chunk::Slot(s) = c { Some(*s) } else { None }).collect();
                self.clear_buf_slots(&slots);
            }
        }
    }

    fn clear_buf_slots(&mut self, slots: &[u16]) {
        let none = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }];
        for &slot in slots {
            // SAFETY: an empty entry references no memory; the kernel keeps what submitted operations use.
            if unsafe { self.ring.submitter().register_buffers_update(u32::from(slot), &none, None) }.is_ok() {
                self.free_buf_slots.push(slot);
            }
        }
    }

    /// The fixed buffer holding `[addr, addr+len)` of `local`'s registered region (registering its chunk with
    /// this ring on first use); `None` for plain reads and writes.
    ///
    /// The table is checked for changes first: memory the engine unregistered before this operation was
    /// submitted (and perhaps registered again at the same address) is never looked up in stale slots.
    fn fixed_index(&mut self, local: &LocalRange, addr: u64, len: u64) -> Option<u16> {
        self.fixed.as_ref()?;
        let region = local.region()?;
        if self.fixed_changed() {
            self.sync_fixed();
        }
        let fixed = self.fixed.as_ref()?;
        let base = region.addr;
        let off = addr.checked_sub(base)?;
        let k = (off / FIXED_CHUNK) as usize;
        if (off + len.max(1) - 1) / FIXED_CHUNK != k as u64 {
            return None; // straddles two chunks
        }
        let entry = match self.fixed_slots.entry(base) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let found = sync::lock(&fixed.regions).get(&base).map(|(id, g)| (*id, g.len, g.is_host()));
                v.insert(match found {
                    Some((id, len, true)) => {
                        FixedRegion { id, len, chunks: vec![Chunk::Untried; len.div_ceil(FIXED_CHUNK) as usize] }
                    }
                    _ => FixedRegion { id: 0, len: 0, chunks: Vec::new() },
                })
            }
        };
        match *entry.chunks.get(k)? {
            Chunk::Slot(slot) => Some(slot),
            Chunk::Failed => None,
            Chunk::Untried => {
                let start = k as u64 * FIXED_CHUNK;
                let chunk = (base + start, (entry.len - start).min(FIXED_CHUNK));
                let got = self.register_chunk(chunk);
                if let Some(r) = self.fixed_slots.get_mut(&base) {
                    r.chunks[k] = got.map_or(Chunk::Failed, Chunk::Slot);
                }
                got
            }
        }
    }

    /// Registers `(addr, len)`, a chunk of registered host memory, as a fixed buffer.
    fn register_chunk(&mut self, (addr, len): (u64, u64)) -> Option<u16> {
        let slot = self.free_buf_slots.pop()?;
        let iov = [libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len as usize }];
        // SAFETY: registered host memory stays mapped while the engine holds it registered; the kernel pins its
        // pages, and this ring stops using the slot (and unregisters it) once the engine unregisters the memory
        // (`sync_fixed`, also run before every lookup that follows a change). Operations still in flight then
        // hold the region, and the kernel keeps the pages they use until they complete.
        match unsafe { self.ring.submitter().register_buffers_update(u32::from(slot), &iov, None) } {
            Ok(()) => Some(slot),
            Err(e) => {
                self.free_buf_slots.push(slot);
                tracing::debug!(error = %e, addr, len,
                    "nvmeof: cannot register memory as an io_uring fixed buffer; plain reads and writes");
                None
            }
        }
    }

    fn ensure_bounce(&mut self) -> bool {
        if !self.bounce.is_empty() {
            return true;
        }
        let size = self.max_io as usize;
        for _ in 0..self.qd {
            match Bounce::new(size) {
                Some(b) => self.bounce.push(b),
                None => break,
            }
        }
        self.free_bounce = (0..self.bounce.len()).rev().collect();
        let iovecs: Vec<libc::iovec> =
            self.bounce.iter().map(|b| libc::iovec { iov_base: b.ptr.cast(), iov_len: b.len }).collect();
        // The bounce buffers take slots 0..qd (of the sparse table when there is one).
        let registered = if iovecs.is_empty() {
            false
        } else if self.buf_table {
            // SAFETY: the buffers stay allocated (and at these addresses) until the ring is dropped, which
            // unregisters them; the kernel writes into them only for operations we submit.
            unsafe { self.ring.submitter().register_buffers_update(0, &iovecs, None) }.is_ok()
        } else {
            // SAFETY: as above.
            unsafe { self.ring.submitter().register_buffers(&iovecs) }.is_ok()
        };
        self.fixed_bufs = registered;
        !self.bounce.is_empty()
    }

    /// Starts `op`, or finishes it at once with an error. `Some(op)` when it must wait for a bounce buffer.
    fn prepare(&mut self, mut op: Op) -> Option<Op> {
        if op.done.as_ref().is_none_or(PieceDone::is_final) {
            op.finish(Err(Error::Canceled));
            return None;
        }
        let file = match op.file.get() {
            Ok(f) => f,
            Err(e) => {
                if matches!(e.kind, FileErrorKind::NotFound) {
                    // The descriptor may be outdated (republished elsewhere): have the engine re-read it.
                    op.file.report_missing();
                }
                op.finish(Err(e.into_error()));
                return None;
            }
        };
        if op.opcode == Opcode::Write && !file.writable {
            let e = FileError::new(&file.path, FileErrorKind::ReadOnly, format!("{}: opened read-only", op.what()));
            op.finish(Err(e.into_error()));
            return None;
        }
        if let Some(errno) = testing::injected(&file.path) {
            let what = op.what();
            op.finish(Err(FileError::os(&file.path, errno, &what).into_error()));
            return None;
        }
        let host = match Span::local(&op.local) {
            Ok(span) => span.host_addr(),
            Err(e) => {
                op.finish(Err(e));
                return None;
            }
        };
        let (off, len, a) = (op.file_off, op.len(), file.align);
        let aligned_io = off % a == 0 && len % a == 0;
        let direct = file.is_direct() && (aligned_io || op.opcode == Opcode::Read);
        let (io_off, io_len) =
            if direct && !aligned_io { (off / a * a, (off + len).div_ceil(a) * a - off / a * a) } else { (off, len) };
        let in_place = match host {
            Some(addr) if !direct => Some(addr),
            Some(addr) if aligned_io && addr % a == 0 => Some(addr),
            _ => None,
        };
        let way = match in_place {
            Some(addr) => Way::InPlace { addr, buf: self.fixed_index(&op.local, addr, io_len) },
            None => {
                if io_len > self.max_io.max(FILE_ALIGN) || !self.ensure_bounce() {
                    let e = Error::NoSpace(format!("nvmeof: no bounce buffer for a {io_len}-byte operation"));
                    op.finish(Err(e));
                    return None;
                }
                let Some(index) = self.free_bounce.pop() else { return Some(op) };
                if op.opcode == Opcode::Write {
                    // Stage the caller's bytes (host or device memory) into the bounce buffer.
                    let staged = Span::local(&op.local)
                        .and_then(|s| s.read_into(0, self.bounce[index].slice_mut(0, len as usize)));
                    if let Err(e) = staged {
                        self.free_bounce.push(index);
                        op.finish(Err(e));
                        return None;
                    }
                }
                Way::Bounce { index }
            }
        };
        let Some(slot) = self.free_slots.pop() else { return Some(op) };
        let f = InFlight { op, file, way, direct, io_off, io_len, progress: 0 };
        let sqe = self.sqe(&f, slot);
        self.slots[slot] = Some(f);
        // SAFETY: the entry's buffer (the caller's memory, held by the op's LocalRange, or a bounce buffer the
        // ring owns) and its file stay valid until its completion is reaped: the InFlight that holds both is
        // released only then.
        let pushed = unsafe { self.ring.submission().push(&sqe) };
        if pushed.is_err() {
            // The ring was sized for qd entries: submit what is queued and retry once.
            self.flush();
            // SAFETY: as above.
            if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                if let Some(mut f) = self.slots[slot].take() {
                    f.op.finish(Err(Error::unavailable("nvmeof: io_uring submission queue full")));
                    self.release(slot, &f);
                }
                return None;
            }
        }
        self.pushed();
        None
    }

    /// Counts an entry pushed; hands the kernel what was pushed once `submit_batch` entries wait. Submitting
    /// each operation at once (the default) lets the device start on it while the next ones are prepared and
    /// completed, as fio does (`iodepth_batch_submit=1`); a large batch arrives at the device all at once.
    fn pushed(&mut self) {
        self.unsubmitted += 1;
        if self.unsubmitted >= self.submit_batch {
            self.flush();
        }
    }

    /// Submits the pushed entries without waiting (errors are left to the main loop's next `io_uring_enter`,
    /// which submits whatever is left).
    fn flush(&mut self) {
        if self.unsubmitted > 0 && self.ring.submit().is_ok() {
            self.unsubmitted = 0;
        }
    }

    /// The submission entry for what is left of `f`.
    fn sqe(&mut self, f: &InFlight, slot: usize) -> squeue::Entry {
        let p = f.progress;
        let len = (f.io_len - p) as u32;
        let off = f.io_off + p;
        let fixed = self.file_slot(&f.file, f.direct);
        let raw = types::Fd(f.file.fd(f.direct));
        let read = f.op.opcode == Opcode::Read;
        let entry = match f.way {
            Way::InPlace { addr, buf: None } => {
                let buf = (addr + p) as *mut u8;
                match (read, fixed) {
                    (true, Some(i)) => opcode::Read::new(types::Fixed(i), buf, len).offset(off).build(),
                    (true, None) => opcode::Read::new(raw, buf, len).offset(off).build(),
                    (false, Some(i)) => opcode::Write::new(types::Fixed(i), buf, len).offset(off).build(),
                    (false, None) => opcode::Write::new(raw, buf, len).offset(off).build(),
                }
            }
            Way::InPlace { addr, buf: Some(bi) } => {
                let buf = (addr + p) as *mut u8;
                match (read, fixed) {
                    (true, Some(i)) => opcode::ReadFixed::new(types::Fixed(i), buf, len, bi).offset(off).build(),
                    (true, None) => opcode::ReadFixed::new(raw, buf, len, bi).offset(off).build(),
                    (false, Some(i)) => opcode::WriteFixed::new(types::Fixed(i), buf, len, bi).offset(off).build(),
                    (false, None) => opcode::WriteFixed::new(raw, buf, len, bi).offset(off).build(),
                }
            }
            Way::Bounce { index } => {
                // SAFETY: `p` is less than the operation's length, which fits the buffer.
                let buf = unsafe { self.bounce[index].ptr.add(p as usize) };
                let bi = index as u16;
                match (read, fixed, self.fixed_bufs) {
                    (true, Some(i), true) => opcode::ReadFixed::new(types::Fixed(i), buf, len, bi).offset(off).build(),
                    (true, None, true) => opcode::ReadFixed::new(raw, buf, len, bi).offset(off).build(),
                    (true, Some(i), false) => opcode::Read::new(types::Fixed(i), buf, len).offset(off).build(),
                    (true, None, false) => opcode::Read::new(raw, buf, len).offset(off).build(),
                    (false, Some(i), true) => {
                        opcode::WriteFixed::new(types::Fixed(i), buf, len, bi).offset(off).build()
                    }
                    (false, None, true) => opcode::WriteFixed::new(raw, buf, len, bi).offset(off).build(),
                    (false, Some(i), false) => opcode::Write::new(types::Fixed(i), buf, len).offset(off).build(),
                    (false, None, false) => opcode::Write::new(raw, buf, len).offset(off).build(),
                }
            }
        };
        entry.user_data(slot as u64)
    }

    /// The fixed-file slot of `file` (registering it on first use), or `None` to use the raw descriptor.
    fn file_slot(&mut self, file: &Arc<OpenFile>, direct: bool) -> Option<u32> {
        if !self.fixed_files {
            return None;
        }
        let direct = direct && file.is_direct();
        if let Some((slot, _)) = self.files.get(&(file.id, direct)) {
            return Some(*slot);
        }
        let slot = self.free_file_slots.pop()?;
        match self.ring.submitter().register_files_update(slot, &[file.fd(direct)]) {
            Ok(_) => {
                self.files.insert((file.id, direct), (slot, file.clone()));
                Some(slot)
            }
            Err(_) => {
                self.free_file_slots.push(slot);
                None
            }
        }
    }

    /// Unregisters files nobody else holds any more (their segments were forgotten).
    fn purge_files(&mut self) {
        let gone: Vec<(u64, bool)> =
            self.files.iter().filter(|(_, (_, f))| Arc::strong_count(f) == 1).map(|(k, _)| *k).collect();
        for k in gone {
            if let Some((slot, _)) = self.files.remove(&k) {
                if self.ring.submitter().register_files_update(slot, &[-1]).is_ok() {
                    self.free_file_slots.push(slot);
                }
            }
        }
    }

    fn release(&mut self, slot: usize, f: &InFlight) {
        if let Way::Bounce { index } = f.way {
            self.free_bounce.push(index);
        }
        self.free_slots.push(slot);
    }

    /// Handles the completions at hand: the first outcome is reported at once (it wakes a submitter), the
    /// others are left in `finished` (see there). Each finished operation frees a slot, which goes at once to
    /// an operation queued meanwhile, so the device is not left short of work.
    fn reap(&mut self, s: &Shared) {
        let mut done = std::mem::take(&mut self.cqes);
        done.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        let mut reported = false;
        for &(slot, res) in &done {
            if slot == WAKE {
                self.wake_armed = false;
                continue;
            }
            let slot = slot as usize;
            let Some(mut f) = self.slots.get_mut(slot).and_then(Option::take) else { continue };
            match self.complete(&mut f, res) {
                Some(r) => {
                    self.release(slot, &f);
                    if reported {
                        sync::lock(&s.finished).push((f.op, r));
                        s.finished_len.fetch_add(1, Ordering::AcqRel);
                    } else {
                        f.op.finish(r);
                        reported = true;
                        self.reported_at = Some(Instant::now());
                    }
                    if s.queued.load(Ordering::Acquire) > 0 {
                        let mut q = sync::lock(&s.queue);
                        self.take(&mut q, s);
                    }
                    self.prepare_pending();
                }
                None => {
                    // Short transfer: resubmit the rest.
                    let sqe = self.sqe(&f, slot);
                    self.slots[slot] = Some(f);
                    // SAFETY: as in `prepare`.
                    if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                        if let Some(mut f) = self.slots[slot].take() {
                            f.op.finish(Err(Error::unavailable("nvmeof: io_uring submission queue full")));
                            self.release(slot, &f);
                        }
                    } else {
                        self.pushed();
                    }
                }
            }
        }
        done.clear();
        self.cqes = done;
    }

    /// The outcome of a completion, or `None` to resubmit the rest.
    fn complete(&mut self, f: &mut InFlight, res: i32) -> Option<Result<u64>> {
        let op = &f.op;
        match outcome(op, &f.file, f.direct, f.io_off, f.io_len, &mut f.progress, res)? {
            Ok(_) => {}
            Err(e) => return Some(Err(e)),
        }
        if let (Way::Bounce { index }, Opcode::Read) = (f.way, op.opcode) {
            let start = (op.file_off - f.io_off) as usize;
            let bytes = self.bounce[index].slice(start, op.len() as usize);
            if let Err(e) = Span::local(&op.local).and_then(|s| s.write_from(0, bytes)) {
                return Some(Err(e));
            }
        }
        Some(Ok(op.len()))
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.fail_inflight(&stopped());
        if self.fixed_bufs || self.buf_table {
            let _ = self.ring.submitter().unregister_buffers();
        }
    }
}

/// What completion `res` means for `op`, whose I/O covers `[io_off, io_off + io_len)` of `file` (`direct`: through
/// its O_DIRECT descriptor) and had moved `progress` bytes before (updated): `Some(Ok(len))` when it is done,
/// `None` when the rest must be submitted again (a short buffered transfer), or the typed error.
pub(crate) fn outcome(
    op: &Op,
    file: &OpenFile,
    direct: bool,
    io_off: u64,
    io_len: u64,
    progress: &mut u64,
    res: i32,
) -> Option<Result<u64>> {
    if res < 0 {
        let errno = -res;
        let mut e = FileError::os(&file.path, errno, &op.what());
        if errno == libc::EINVAL && direct {
            e.detail.push_str(" (O_DIRECT refused this operation's alignment)");
        }
        if errno == libc::EBADF && op.opcode == Opcode::Write {
            e.kind = FileErrorKind::ReadOnly;
        }
        return Some(Err(e.into_error()));
    }
    *progress += res as u64;
    // Bytes the operation needs from the covering range (reads may stop at end of file past them).
    let needed = op.file_off + op.len() - io_off;
    let enough = if op.opcode == Opcode::Read { *progress >= needed } else { *progress >= io_len };
    if !enough {
        if res == 0 || direct {
            if op.opcode == Opcode::Read {
                let size = file.size().map_or("unknown".into(), |s| s.to_string());
                let detail = format!(
                    "{}: end of file after {} bytes (the file has {size} bytes, the segment publishes {}; truncated \
                     underneath, or published too long)",
                    op.what(),
                    (*progress).min(needed),
                    op.file.published
                );
                return Some(Err(FileError::new(&file.path, FileErrorKind::ShortFile, detail).into_error()));
            }
            let detail = format!("{}: short write ({} of {} bytes)", op.what(), *progress, io_len);
            return Some(Err(FileError::new(&file.path, FileErrorKind::Other, detail).into_error()));
        }
        return None;
    }
    Some(Ok(op.len()))
}

/// Whether the local range is CUDA memory (for cuFile).
pub fn is_cuda(local: &LocalRange) -> bool {
    matches!(local.access(), mooncake_core::Access::Device(d) if d.device.kind() == MemoryKind::Cuda)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_at_block_boundaries() {
        assert_eq!(cut(0, 8192, 4096), vec![(0, 4096), (4096, 4096)]);
        assert_eq!(cut(10, 20, 1 << 20), vec![(0, 20)]);
        assert_eq!(cut(4000, 200, 1 << 20), vec![(0, 96), (96, 104)]);
        assert_eq!(
            cut(100, 3 << 20, 1 << 20),
            vec![
                (0, 3996),
                (3996, 1 << 20),
                (3996 + (1 << 20), 1 << 20),
                (3996 + (2 << 20), (1 << 20) - 4096),
                (3996 + (3 << 20) - 4096, 100),
            ]
        );
        let total: u64 = cut(7, 1_000_003, 65536).iter().map(|p| p.1).sum();
        assert_eq!(total, 1_000_003);
    }
}
