//! The caller-thread path: a synchronous call (`batch_transfer_sync` and friends) submits its reads and writes
//! to a ring of the calling thread and reaps them itself, instead of handing them to an I/O thread and being
//! woken when it is done (two thread hand-offs, tens of microseconds each on a virtual machine, per call).
//!
//! It takes calls whose every operation goes straight between a file and host memory (see the `io` module:
//! aligned for O_DIRECT, or buffered); anything that needs a bounce buffer or a device's copies (unaligned
//! direct reads, unaligned memory, GPU memory) goes the queued way, as does a thread that cannot set up a ring.
//! Operations are submitted one per `io_uring_enter` by default (`submit_batch`), at most [`ENTRIES`] in flight.
//! Errors are typed exactly as on the queued path.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::Arc;

use io_uring::{IoUring, opcode, types};
use mooncake_core::{BlockingRequest, Error, Opcode, Result};
use mooncake_raw::Span;

use crate::error::{FileError, FileErrorKind};
use crate::io::{self, FileEntry, Op, OpenFile};
use crate::transport::SegFiles;

/// Entries of each calling thread's ring (and operations in flight on it).
const ENTRIES: u32 = 64;

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// One operation of a call.
struct Piece {
    /// Index of its request.
    req: usize,
    op: Op,
    file: Arc<OpenFile>,
    direct: bool,
    /// Host address of its bytes.
    addr: u64,
    progress: u64,
}

/// Runs `requests` (one opcode, offsets into the segment `seg` named `name`) on this thread: one result per
/// request, or `None` when some operation needs the queued path (nothing was started then).
pub(crate) fn run(
    seg: &SegFiles,
    name: &str,
    opcode: Opcode,
    requests: &[BlockingRequest],
    max_io: u64,
    submit_batch: usize,
) -> Option<Vec<Result<u64>>> {
    let mut results: Vec<Result<u64>> = requests.iter().map(|r| Ok(r.length())).collect();
    let mut pieces = Vec::new();
    let mut touched: HashSet<*const FileEntry> = HashSet::new();
    for (req, r) in requests.iter().enumerate() {
        let cut = match seg.pieces(name, &r.local, r.remote_addr, max_io) {
            Ok(c) => c,
            Err(e) => {
                results[req] = Err(e);
                continue;
            }
        };
        let span = match Span::local(&r.local) {
            Ok(span) => span,
            Err(e) => {
                results[req] = Err(e);
                continue;
            }
        };
        // Device memory is staged through its device: the queued path.
        let host = span.host_addr()?;
        let first = pieces.len();
        for (i, file_off, local_off, n) in cut {
            let entry = seg.files[i].clone();
            if touched.insert(Arc::as_ptr(&entry)) {
                entry.forget_if_unlinked();
            }
            let Some(local) = r.local.sub(local_off, n) else {
                results[req] = Err(Error::InvalidArgument("nvmeof: a slice outside its request".into()));
                break;
            };
            let op = Op { file: entry, file_off, opcode, local, done: None };
            match check(&op) {
                Ok(file) => {
                    let aligned = file_off % file.align() == 0 && n % file.align() == 0;
                    let addr = host + local_off;
                    // As the I/O thread decides: O_DIRECT for aligned operations (and reads, which would bounce
                    // when unaligned), the page cache otherwise; in place unless O_DIRECT needs aligned memory.
                    let direct = file.is_direct() && (aligned || opcode == Opcode::Read);
                    if direct && !(aligned && addr % file.align() == 0) {
                        return None;
                    }
                    pieces.push(Piece { req, op, file, direct, addr, progress: 0 });
                }
                Err(e) => {
                    results[req] = Err(e);
                    break;
                }
            }
        }
        if results[req].is_err() {
            pieces.truncate(first);
        }
    }
    if pieces.is_empty() {
        return Some(results);
    }
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = IoUring::new(ENTRIES).ok();
        }
        let ring = slot.as_mut()?;
        drive(ring, &mut pieces, &mut results, submit_batch.max(1));
        Some(())
    })?;
    Some(results)
}

/// The open file for `op`, or why it cannot run (as the I/O thread checks).
fn check(op: &Op) -> Result<Arc<OpenFile>> {
    let file = op.file.get().map_err(|e| {
        if matches!(e.kind, FileErrorKind::NotFound) {
            op.file.report_missing();
        }
        e.into_error()
    })?;
    if op.opcode == Opcode::Write && !file.is_writable() {
        let what = format!("write of {} bytes at offset {}", op.local.len(), op.file_off);
        return Err(
            FileError::new(file.path(), FileErrorKind::ReadOnly, format!("{what}: opened read-only")).into_error()
        );
    }
    if let Some(errno) = io::testing::injected(file.path()) {
        let what = if op.opcode == Opcode::Read { "read" } else { "write" };
        let what = format!("{what} of {} bytes at offset {}", op.local.len(), op.file_off);
        return Err(FileError::os(file.path(), errno, &what).into_error());
    }
    Ok(file)
}

/// Submits every piece (at most `ENTRIES` in flight, `batch` per `io_uring_enter`) and reaps them all; a
/// request's result becomes the first error of its pieces. Returns only once the kernel is done with every
/// buffer, whatever fails.
fn drive(ring: &mut IoUring, pieces: &mut [Piece], results: &mut [Result<u64>], batch: usize) {
    let mut next = 0usize;
    let mut again: Vec<usize> = Vec::new();
    let mut inflight = 0usize;
    let mut unsubmitted = 0usize;
    let mut broken: Option<Error> = None;
    loop {
        while inflight < ENTRIES as usize && broken.is_none() {
            let i = match again.pop() {
                Some(i) => i,
                None if next < pieces.len() => {
                    next += 1;
                    next - 1
                }
                None => break,
            };
            if results[pieces[i].req].is_err() {
                continue; // another piece of its request failed
            }
            let sqe = entry(&pieces[i]).user_data(i as u64);
            // SAFETY: the entry's buffer is the caller's host memory, proven by the piece's LocalRange, and its
            // file is held by the piece; both outlive the operation: this function returns only once every
            // submitted entry has completed.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                again.push(i);
                break;
            }
            inflight += 1;
            unsubmitted += 1;
            if unsubmitted >= batch {
                if let Err(e) = submit(ring, 0) {
                    broken = Some(e);
                }
                unsubmitted = 0;
            }
        }
        if inflight == 0 {
            break;
        }
        if let Err(e) = submit(ring, 1) {
            // Entries already in the kernel still complete: keep reaping them, start nothing new.
            broken.get_or_insert(e);
            if ring.completion().is_empty() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        unsubmitted = 0;
        let done: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (i, res) in done {
            inflight -= 1;
            let Some(p) = pieces.get_mut(i as usize) else { continue };
            let (off, len) = (p.op.file_off, p.op.local.len());
            match io::outcome(&p.op, &p.file, p.direct, off, len, &mut p.progress, res) {
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    if results[p.req].is_ok() {
                        results[p.req] = Err(e);
                    }
                }
                None => again.push(i as usize),
            }
        }
    }
    if let Some(e) = broken {
        for (i, p) in pieces.iter().enumerate() {
            if (i >= next || again.contains(&i)) && results[p.req].is_ok() {
                results[p.req] = Err(e.clone());
            }
        }
    }
}

/// Hands the kernel what was pushed, waiting for `want` completions; interrupted calls are retried.
fn submit(ring: &mut IoUring, want: usize) -> Result<()> {
    loop {
        match ring.submit_and_wait(want) {
            Ok(_) => return Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => {
                if want == 0 || !ring.completion().is_empty() {
                    return Ok(());
                }
            }
            Err(e) => return Err(Error::unavailable(format!("nvmeof: io_uring_enter failed: {e}"))),
        }
    }
}

/// The read or write for what is left of `p`.
fn entry(p: &Piece) -> io_uring::squeue::Entry {
    let left = (p.op.local.len() - p.progress) as u32;
    let buf = (p.addr + p.progress) as *mut u8;
    let fd = types::Fd(p.file.raw_fd(p.direct));
    let off = p.op.file_off + p.progress;
    match p.op.opcode {
        Opcode::Read => opcode::Read::new(fd, buf, left).offset(off).build(),
        _ => opcode::Write::new(fd, buf, left).offset(off).build(),
    }
}
