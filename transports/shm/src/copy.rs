//! Moving a list of ranges with as few `process_vm_*` calls as possible: consecutive ranges share
//! one call (up to `IOV_MAX` iovecs per side), large ranges are cut into calls of at most
//! [`MAX_CALL_BYTES`] (so no single system call runs for long and a deadline is checked between
//! calls), and short transfers resume where the kernel stopped.

use std::io;
use std::time::Instant;

use mooncake_core::Opcode;

use crate::sys::{self, IOV_MAX, IoVec};

/// Most bytes one system call moves.
pub(crate) const MAX_CALL_BYTES: u64 = 4 << 20;

/// One request's addresses: `len` bytes between `local` (this process) and `remote` (the target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Range {
    pub local: u64,
    pub remote: u64,
    pub len: u64,
}

/// A position in a list of ranges: range `idx`, `off` bytes into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Cursor {
    pub idx: usize,
    pub off: u64,
}

/// Fills `local`/`remote` with the iovecs of the next call starting at `from`: whole ranges while
/// they fit, the last one possibly cut at `max_bytes`. Returns the bytes the call covers (0 only
/// when `from` is at the end).
pub(crate) fn plan_call(
    ranges: &[Range],
    from: Cursor,
    max_iov: usize,
    max_bytes: u64,
    local: &mut Vec<IoVec>,
    remote: &mut Vec<IoVec>,
) -> u64 {
    local.clear();
    remote.clear();
    let mut total = 0u64;
    let mut cur = from;
    while cur.idx < ranges.len() && local.len() < max_iov && total < max_bytes {
        let r = ranges[cur.idx];
        let n = (r.len - cur.off).min(max_bytes - total);
        if n > 0 {
            local.push(sys::iovec(r.local + cur.off, n));
            remote.push(sys::iovec(r.remote + cur.off, n));
            total += n;
        }
        if cur.off + n == r.len {
            cur = Cursor { idx: cur.idx + 1, off: 0 };
        } else {
            break;
        }
    }
    total
}

/// The cursor `n` bytes after `from` (ranges of zero length are stepped over).
pub(crate) fn advance(ranges: &[Range], from: Cursor, mut n: u64) -> Cursor {
    let mut cur = from;
    while cur.idx < ranges.len() {
        let left = ranges[cur.idx].len - cur.off;
        if n < left {
            cur.off += n;
            return cur;
        }
        n -= left;
        cur = Cursor { idx: cur.idx + 1, off: 0 };
        if n == 0 {
            break;
        }
    }
    while cur.idx < ranges.len() && ranges[cur.idx].len == 0 {
        cur.idx += 1;
    }
    cur
}

/// Why [`Copier::run`] stopped early.
#[derive(Debug)]
pub(crate) enum Stop {
    /// A system call failed at range `idx`.
    Os { idx: usize, error: io::Error },
    /// `deadline` passed before range `idx` was done.
    Deadline { idx: usize },
}

/// Reusable iovec buffers (one per worker thread: no allocation per request).
#[derive(Debug, Default)]
pub(crate) struct Copier {
    local: Vec<IoVec>,
    remote: Vec<IoVec>,
}

impl Copier {
    /// Moves every range (all in direction `op`) to or from process `pid`, calling `done(i)` as
    /// soon as range `i` is complete. Stops at the first failing call; ranges before the returned
    /// index are complete and were reported.
    ///
    /// The caller guarantees that every local range stays valid for the call (it holds a region
    /// guard) and that every remote range was checked against the target's live registrations.
    pub(crate) fn run(
        &mut self,
        pid: i32,
        op: Opcode,
        ranges: &[Range],
        deadline: Option<Instant>,
        mut done: impl FnMut(usize),
    ) -> Result<(), Stop> {
        let mut cur = advance(ranges, Cursor::default(), 0);
        for i in 0..cur.idx {
            done(i);
        }
        while cur.idx < ranges.len() {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Stop::Deadline { idx: cur.idx });
            }
            let want = plan_call(ranges, cur, IOV_MAX, MAX_CALL_BYTES, &mut self.local, &mut self.remote);
            let n = sys::process_vm(pid, op, &self.local, &self.remote)
                .map_err(|error| Stop::Os { idx: cur.idx, error })?;
            if n == 0 && want > 0 {
                // No progress: the range at the cursor is not (fully) mapped on one side.
                return Err(Stop::Os { idx: cur.idx, error: io::Error::from_raw_os_error(libc::EFAULT) });
            }
            let next = advance(ranges, cur, n as u64);
            for i in cur.idx..next.idx {
                done(i);
            }
            cur = next;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(local: u64, remote: u64, len: u64) -> Range {
        Range { local, remote, len }
    }

    fn lens(v: &[IoVec]) -> Vec<usize> {
        v.iter().map(|i| i.iov_len).collect()
    }

    #[test]
    fn small_ranges_share_one_call_up_to_iov_max() {
        let ranges: Vec<Range> = (0..2500u64).map(|i| r(i * 4096, (1 << 40) + i * 4096, 4096)).collect();
        let (mut l, mut m) = (Vec::new(), Vec::new());
        let mut cur = Cursor::default();
        let mut calls = 0;
        while cur.idx < ranges.len() {
            let n = plan_call(&ranges, cur, IOV_MAX, u64::MAX, &mut l, &mut m);
            assert!(l.len() <= IOV_MAX && l.len() == m.len());
            assert_eq!(n, l.len() as u64 * 4096);
            assert_eq!(m[0].iov_base as u64, ranges[cur.idx].remote);
            cur = advance(&ranges, cur, n);
            calls += 1;
        }
        assert_eq!(calls, 3, "2500 ranges in calls of at most 1024 iovecs");
    }

    #[test]
    fn large_ranges_are_cut_at_the_call_limit() {
        let ranges = [r(0x1000, 0x10_0000, 10 << 20), r(0x90_0000, 0x200_0000, 100)];
        let (mut l, mut m) = (Vec::new(), Vec::new());
        let mut cur = Cursor::default();
        let mut sizes = Vec::new();
        while cur.idx < ranges.len() {
            let n = plan_call(&ranges, cur, IOV_MAX, MAX_CALL_BYTES, &mut l, &mut m);
            sizes.push(lens(&l));
            // Local and remote advance in step.
            assert_eq!(l[0].iov_base as u64 - ranges[cur.idx].local, m[0].iov_base as u64 - ranges[cur.idx].remote);
            cur = advance(&ranges, cur, n);
        }
        assert_eq!(sizes, vec![vec![4 << 20], vec![4 << 20], vec![2 << 20, 100]]);
    }

    #[test]
    fn partial_transfers_resume_mid_range() {
        let ranges = [r(0, 1000, 10), r(100, 2000, 20), r(200, 3000, 5)];
        assert_eq!(advance(&ranges, Cursor::default(), 3), Cursor { idx: 0, off: 3 });
        assert_eq!(advance(&ranges, Cursor::default(), 10), Cursor { idx: 1, off: 0 });
        assert_eq!(advance(&ranges, Cursor { idx: 0, off: 3 }, 17), Cursor { idx: 1, off: 10 });
        assert_eq!(advance(&ranges, Cursor::default(), 35), Cursor { idx: 3, off: 0 });
        let (mut l, mut m) = (Vec::new(), Vec::new());
        let n = plan_call(&ranges, Cursor { idx: 1, off: 10 }, IOV_MAX, 1 << 20, &mut l, &mut m);
        assert_eq!(n, 15);
        assert_eq!(l[0].iov_base as u64, 110);
        assert_eq!(m[0].iov_base as u64, 2010);
        assert_eq!(lens(&l), vec![10, 5]);
        // Zero-length ranges are stepped over.
        let z = [r(0, 0, 0), r(0, 0, 4), r(0, 0, 0)];
        assert_eq!(advance(&z, Cursor::default(), 0), Cursor { idx: 1, off: 0 });
        assert_eq!(advance(&z, Cursor { idx: 1, off: 0 }, 4), Cursor { idx: 3, off: 0 });
        assert_eq!(plan_call(&z, Cursor { idx: 3, off: 0 }, IOV_MAX, 10, &mut l, &mut m), 0);
    }

    #[test]
    fn copies_many_ranges_of_this_process() {
        let src: Vec<u8> = (0..(9u32 << 20)).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; src.len()];
        let (s, d) = (src.as_ptr() as u64, dst.as_mut_ptr() as u64);
        // 1500 small ranges, then one range larger than a call, as reads from "remote" src.
        let mut ranges: Vec<Range> = (0..1500u64).map(|i| r(d + i * 1000, s + i * 1000, 1000)).collect();
        ranges.push(r(d + 1_500_000, s + 1_500_000, src.len() as u64 - 1_500_000));
        let mut seen = Vec::new();
        Copier::default().run(std::process::id() as i32, Opcode::Read, &ranges, None, |i| seen.push(i)).unwrap();
        assert_eq!(seen, (0..ranges.len()).collect::<Vec<_>>());
        assert!(dst == src);
    }

    #[test]
    fn failures_name_the_range_and_keep_earlier_ones() {
        let src = vec![7u8; 8192];
        let mut dst = vec![0u8; 8192];
        let (s, d) = (src.as_ptr() as u64, dst.as_mut_ptr() as u64);
        let ranges = [r(d, s, 4096), r(d + 4096, 0x10, 4096)];
        let mut seen = Vec::new();
        let e = Copier::default()
            .run(std::process::id() as i32, Opcode::Read, &ranges, None, |i| seen.push(i))
            .unwrap_err();
        assert!(matches!(e, Stop::Os { idx: 1, ref error } if error.raw_os_error() == Some(libc::EFAULT)), "{e:?}");
        assert_eq!(seen, vec![0]);
        assert!(dst[..4096].iter().all(|b| *b == 7));
        let past = Instant::now() - std::time::Duration::from_secs(1);
        let e =
            Copier::default().run(std::process::id() as i32, Opcode::Read, &ranges, Some(past), |_| {}).unwrap_err();
        assert!(matches!(e, Stop::Deadline { idx: 0 }));
    }
}
