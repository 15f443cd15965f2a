//! The copy threads: dedicated OS threads (never the async runtime's workers) that take jobs from
//! one queue, check every range, and run the system calls.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use mooncake_core::{Error, LocalRange, Opcode, PeerEvents, PieceDone, RegionGuard, RegionTable, Result, sync};
use mooncake_raw::Span;

use crate::copy::{Copier, Range, Stop};
use crate::peer::Conn;
use crate::table::{BufRef, Lease, Refusal};

/// One range to move, already matched with the target buffer that contains it.
#[derive(Debug)]
pub(crate) struct Item {
    pub op: Opcode,
    /// The local range with its proof (it keeps the local region registered until the item is dropped).
    pub local: LocalRange,
    pub remote: u64,
    pub buf: BufRef,
    pub done: Option<PieceDone>,
}

impl Item {
    fn len(&self) -> u64 {
        self.local.len()
    }

    fn finish(&mut self, r: Result<u64>) {
        if let Some(d) = self.done.take() {
            d.finish(r);
        }
    }
}

/// Items for one target, run by one thread in order.
#[derive(Debug)]
pub(crate) struct Job {
    pub conn: Arc<Conn>,
    pub items: Vec<Item>,
}

impl Job {
    fn fail(mut self, e: &Error) {
        for it in &mut self.items {
            it.finish(Err(e.clone()));
        }
    }
}

struct Shared {
    queue: Mutex<VecDeque<Job>>,
    ready: Condvar,
    queued: AtomicUsize,
    stop: AtomicBool,
    spin: Duration,
    regions: Arc<RegionTable>,
    events: Arc<dyn PeerEvents>,
}

/// The copy threads of one transport.
pub(crate) struct Pool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("queued", &self.shared.queued.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

impl Pool {
    /// Starts `workers` threads. Each polls the queue for `spin` after a job before sleeping.
    pub(crate) fn spawn(
        workers: usize,
        spin: Duration,
        regions: Arc<RegionTable>,
        events: Arc<dyn PeerEvents>,
    ) -> Result<Pool> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            queued: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            spin,
            regions,
            events,
        });
        for i in 0..workers.max(1) {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("mooncake-shm-{i}"))
                .spawn(move || worker(&s))
                .map_err(|e| Error::unavailable(format!("shm: cannot start copy thread {i}: {e}")))?;
        }
        Ok(Pool { shared })
    }

    /// Queues jobs; they fail at once when the pool was stopped.
    pub(crate) fn push(&self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let n = jobs.len();
        {
            let mut q = sync::lock(&self.shared.queue);
            if self.shared.stop.load(Ordering::Acquire) {
                drop(q);
                for j in jobs {
                    j.fail(&stopped());
                }
                return;
            }
            q.extend(jobs);
            self.shared.queued.fetch_add(n, Ordering::Release);
        }
        for _ in 0..n {
            self.shared.ready.notify_one();
        }
    }

    /// Stops the threads after their current job and fails everything still queued.
    pub(crate) fn stop(&self) {
        let left: Vec<Job> = {
            let mut q = sync::lock(&self.shared.queue);
            self.shared.stop.store(true, Ordering::Release);
            self.shared.queued.store(0, Ordering::Release);
            q.drain(..).collect()
        };
        self.shared.ready.notify_all();
        for j in left {
            j.fail(&stopped());
        }
    }
}

fn stopped() -> Error {
    Error::NotInitialized("the shm transport was shut down".into())
}

fn worker(s: &Shared) {
    let mut copier = Copier::default();
    let mut scratch = Scratch::default();
    loop {
        let job = {
            let mut q = sync::lock(&s.queue);
            loop {
                if let Some(j) = q.pop_front() {
                    s.queued.fetch_sub(1, Ordering::AcqRel);
                    break Some(j);
                }
                if s.stop.load(Ordering::Acquire) {
                    break None;
                }
                // Poll a little before sleeping: waking a sleeping thread costs tens of
                // microseconds, and submitters often send the next batch right away.
                drop(q);
                let until = Instant::now() + s.spin;
                while s.queued.load(Ordering::Acquire) == 0 && Instant::now() < until && !s.stop.load(Ordering::Acquire)
                {
                    std::hint::spin_loop();
                }
                q = sync::lock(&s.queue);
                if q.is_empty() && !s.stop.load(Ordering::Acquire) {
                    q = sync::wait(&s.ready, q);
                }
            }
        };
        match job {
            Some(j) => run_job(j, &s.regions, s.events.as_ref(), &mut copier, &mut scratch),
            None => return,
        }
    }
}

/// Per-thread buffers reused across jobs.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    ranges: Vec<Range>,
    owners: Vec<usize>,
}

/// Runs one job: checks the target is alive, checks each item's local range against registered
/// memory and its remote range against the target's live table, then copies, finishing every
/// item exactly once.
pub(crate) fn run_job(
    mut job: Job,
    regions: &RegionTable,
    events: &dyn PeerEvents,
    copier: &mut Copier,
    scratch: &mut Scratch,
) {
    let conn = job.conn.clone();
    if let Err(e) = conn.check_alive() {
        events.peer_failed(&conn.name);
        job.fail(&e);
        return;
    }
    scratch.ranges.clear();
    scratch.owners.clear();
    let mut guards: Vec<RegionGuard> = Vec::with_capacity(job.items.len());
    let mut leases: Vec<Lease<'_>> = Vec::with_capacity(job.items.len());
    let mut stale = false;
    let mut closed = None;
    let items = &mut job.items;
    for (i, it) in items.iter_mut().enumerate() {
        if it.done.as_ref().is_none_or(PieceDone::is_final) {
            it.finish(Err(Error::Canceled));
            continue;
        }
        // The kernel writes this process's memory at the local address: registered memory only, held for the
        // copy; the span says whether the CPU may hand the address over (host memory) or must stage it.
        let guard = match it.local.registered_in(regions, LOCAL_CONTEXT) {
            Ok(g) => g,
            Err(e) => {
                it.finish(Err(e));
                continue;
            }
        };
        let host_addr = match Span::local(&it.local) {
            Ok(span) => span.host_addr(),
            Err(e) => {
                it.finish(Err(e));
                continue;
            }
        };
        let Some(local) = host_addr else {
            // Device memory: staged through its device, one request at a time.
            let r = run_staged(it, &conn, copier);
            if let Err(e) = &r {
                if e.is_disconnect() {
                    events.peer_failed(&conn.name);
                }
            }
            it.finish(r);
            continue;
        };
        match conn.table.acquire(&it.buf) {
            Ok(lease) => {
                guards.push(guard);
                leases.push(lease);
                scratch.ranges.push(Range { local, remote: it.remote, len: it.len() });
                scratch.owners.push(i);
            }
            Err(Refusal::Stale) => {
                stale = true;
                it.finish(Err(conn.refusal(Refusal::Stale, it.remote, it.len())));
            }
            Err(Refusal::Closed) => {
                closed = Some(conn.refusal(Refusal::Closed, it.remote, it.len()));
                break;
            }
        }
    }
    if let Some(e) = closed {
        drop(leases);
        events.peer_failed(&conn.name);
        job.fail(&e);
        return;
    }
    if stale {
        // Have the engine re-read the descriptor before the next request to this segment.
        events.peer_failed(&conn.name);
    }
    let (ranges, owners) = (&scratch.ranges, &scratch.owners);
    let mut a = 0;
    while a < ranges.len() {
        let op = items[owners[a]].op;
        let b = (a..ranges.len()).find(|k| items[owners[*k]].op != op).unwrap_or(ranges.len());
        let r = copier.run(conn.pid, op, &ranges[a..b], None, |k| {
            let it = &mut items[owners[a + k]];
            let len = it.len();
            it.finish(Ok(len));
        });
        match r {
            Ok(()) => a = b,
            Err(Stop::Os { idx, error }) => {
                let at = a + idx;
                let e = conn.os_error(&error, op, ranges[at].remote, ranges[at].len);
                items[owners[at]].finish(Err(e.clone()));
                if is_fatal(&e) {
                    if e.is_disconnect() {
                        events.peer_failed(&conn.name);
                    }
                    for k in at + 1..ranges.len() {
                        items[owners[k]].finish(Err(e.clone()));
                    }
                    break;
                }
                a = at + 1;
            }
            Err(Stop::Deadline { idx }) => {
                // No deadline is given on this path; finish defensively.
                for k in a + idx..ranges.len() {
                    items[owners[k]].finish(Err(Error::Timeout(Duration::ZERO)));
                }
                break;
            }
        }
    }
    drop(leases);
    drop(guards);
}

/// Errors after which no further request to the same target can succeed.
pub(crate) fn is_fatal(e: &Error) -> bool {
    matches!(e, Error::RemoteDisconnected { .. } | Error::Unavailable { .. })
}

/// How a local range outside registered memory is reported.
pub(crate) const LOCAL_CONTEXT: &str =
    "local buffer: shm copies only from and into registered memory (register it first)";

/// Moves one item whose local side is device memory: the device stages it in a host buffer, which the kernel
/// copies to or from the target. The caller holds the item's local region.
fn run_staged(it: &Item, conn: &Conn, copier: &mut Copier) -> Result<u64> {
    let len = it.len();
    let _lease = conn.table.acquire(&it.buf).map_err(|r| conn.refusal(r, it.remote, len))?;
    let span = Span::local(&it.local)?;
    let mut staged = match it.op {
        Opcode::Write => span.bytes()?.into_owned(),
        Opcode::Read => vec![0u8; len as usize],
    };
    let range = Range { local: staged.as_mut_ptr() as u64, remote: it.remote, len };
    copier.run(conn.pid, it.op, &[range], None, |_| {}).map_err(|stop| match stop {
        Stop::Os { error, .. } => conn.os_error(&error, it.op, it.remote, len),
        Stop::Deadline { .. } => Error::Timeout(Duration::ZERO),
    })?;
    if it.op == Opcode::Read {
        span.write_from(0, &staged)?;
    }
    Ok(len)
}
