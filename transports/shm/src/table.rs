//! The registration table: a small sealed memfd that a target shares with its initiators, so a
//! one-sided copy never lands in memory the target has unregistered (see the crate docs).
//!
//! Layout (native endianness; all words are 64-bit atomics, so any bit pattern is valid):
//!
//! ```text
//! header (64 B): magic "MCSHMTB1" | version | slot count | token[2] | closed | padding
//! slot i (64 B): seq | addr | len | inflight | padding
//! ```
//!
//! `seq` is odd while the slot holds a live registration and even otherwise; every registration
//! of a slot gets a new odd value, so `(slot, seq)` names one registration forever. The descriptor
//! publishes `(slot, seq)` for each buffer. An initiator raises `inflight`, then checks `closed`
//! and `seq`; the target first changes `seq` (or sets `closed`), then waits for `inflight` to drop
//! to zero. With sequentially consistent atomics on both sides either the initiator sees the
//! change and backs off, or the target sees the initiator and waits for its copy to finish.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mooncake_core::{Error, Result, sync};

use crate::sys::{self, Mapping};

const MAGIC: u64 = u64::from_be_bytes(*b"MCSHMTB1");
const VERSION: u64 = 1;
const HEADER_BYTES: usize = 64;
const SLOT_BYTES: usize = 64;
/// Most slots a table may have (64 MiB of table).
pub(crate) const MAX_SLOTS: u32 = 1 << 20;

#[repr(C)]
struct Header {
    magic: AtomicU64,
    version: AtomicU64,
    slots: AtomicU64,
    token: [AtomicU64; 2],
    closed: AtomicU64,
    _pad: [AtomicU64; 2],
}

#[repr(C)]
struct Slot {
    seq: AtomicU64,
    addr: AtomicU64,
    len: AtomicU64,
    inflight: AtomicU64,
    _pad: [AtomicU64; 4],
}

const _: () = assert!(size_of::<Header>() == HEADER_BYTES && size_of::<Slot>() == SLOT_BYTES);

/// Bytes of a table with `slots` slots, rounded up to whole pages.
pub(crate) fn table_bytes(slots: u32) -> usize {
    (HEADER_BYTES + slots as usize * SLOT_BYTES).next_multiple_of(4096)
}

/// A mapped table.
#[derive(Debug)]
struct View {
    map: Mapping,
    slots: u32,
}

impl View {
    fn new(map: Mapping, slots: u32) -> Option<View> {
        (slots <= MAX_SLOTS && map.len() >= table_bytes(slots)).then_some(View { map, slots })
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is page aligned and at least `table_bytes(slots)` long (checked in
        // `new`), so the header is in bounds and aligned; it consists of atomics only, valid for
        // any bit pattern and for concurrent access by other processes; it lives as long as `self`.
        unsafe { &*self.map.as_ptr().cast::<Header>() }
    }

    fn slot(&self, i: u32) -> Option<&Slot> {
        if i >= self.slots {
            return None;
        }
        let offset = HEADER_BYTES + i as usize * SLOT_BYTES;
        // SAFETY: `i < slots` keeps the slot inside the mapping (see `new`); offsets are multiples
        // of 64 from a page-aligned start; slots are atomics only, as the header.
        Some(unsafe { &*self.map.as_ptr().add(offset).cast::<Slot>() })
    }
}

/// The published identity of one registration: what an initiator checks before each copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BufRef {
    /// Start address in the target.
    pub addr: u64,
    /// Length.
    pub len: u64,
    /// Table slot.
    pub slot: u32,
    /// Sequence number of the registration (odd).
    pub seq: u64,
}

impl BufRef {
    /// True when `[addr, addr+len)` lies inside this buffer (`len` > 0, no overflow).
    pub(crate) fn contains(&self, addr: u64, len: u64) -> bool {
        match (addr.checked_add(len), self.addr.checked_add(self.len)) {
            (Some(end), Some(buf_end)) => len > 0 && addr >= self.addr && end <= buf_end,
            _ => false,
        }
    }
}

#[derive(Debug, Default)]
struct OwnerState {
    free: Vec<u32>,
    next: u32,
    live: HashMap<u64, BufRef>,
}

/// The target's side: creates the table and keeps it in step with registrations.
#[derive(Debug)]
pub(crate) struct OwnerTable {
    fd: OwnedFd,
    view: View,
    token: [u64; 2],
    state: Mutex<OwnerState>,
}

impl OwnerTable {
    /// A fresh table with room for `slots` registrations.
    pub(crate) fn create(slots: u32) -> Result<OwnerTable> {
        let slots = slots.clamp(1, MAX_SLOTS);
        let bytes = table_bytes(slots);
        let fd = sys::sealed_memfd("mooncake-shm-table", bytes as u64)
            .map_err(|e| Error::unavailable(format!("shm: cannot create the registration table (memfd): {e}")))?;
        let map = Mapping::shared(&fd, bytes)
            .map_err(|e| Error::unavailable(format!("shm: cannot map the registration table: {e}")))?;
        let view = View::new(map, slots).ok_or_else(|| Error::unavailable("shm: registration table too small"))?;
        let token = sys::random_token();
        let h = view.header();
        h.version.store(VERSION, Ordering::Relaxed);
        h.slots.store(u64::from(slots), Ordering::Relaxed);
        h.token[0].store(token[0], Ordering::Relaxed);
        h.token[1].store(token[1], Ordering::Relaxed);
        h.magic.store(MAGIC, Ordering::Release);
        Ok(OwnerTable { fd, view, token, state: Mutex::new(OwnerState::default()) })
    }

    /// The memfd's descriptor number in this process (initiators open `/proc/<pid>/fd/<n>`).
    pub(crate) fn fd_number(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Slot count.
    pub(crate) fn slots(&self) -> u32 {
        self.view.slots
    }

    /// Random identity of this table (published; checked by initiators after mapping it).
    pub(crate) fn token(&self) -> [u64; 2] {
        self.token
    }

    /// Publishes `[addr, addr+len)` in a free slot.
    pub(crate) fn register(&self, addr: u64, len: u64) -> Result<BufRef> {
        let mut st = sync::lock(&self.state);
        if st.live.contains_key(&addr) {
            return Err(Error::AlreadyExists(format!("shm: a buffer at {addr:#x} is already in the table")));
        }
        let slot = match st.free.pop() {
            Some(s) => s,
            None if st.next < self.view.slots => {
                st.next += 1;
                st.next - 1
            }
            None => {
                return Err(Error::NoSpace(format!(
                    "shm: all {} registration slots are in use; raise max_buffers / MC_SHM_MAX_BUFFERS",
                    self.view.slots
                )));
            }
        };
        let s = self.slot(slot)?;
        let old = s.seq.load(Ordering::Relaxed);
        let seq = if old % 2 == 0 { old + 1 } else { old + 2 };
        s.addr.store(addr, Ordering::Relaxed);
        s.len.store(len, Ordering::Relaxed);
        s.seq.store(seq, Ordering::SeqCst);
        let b = BufRef { addr, len, slot, seq };
        st.live.insert(addr, b);
        Ok(b)
    }

    fn slot(&self, i: u32) -> Result<&Slot> {
        self.view.slot(i).ok_or_else(|| Error::InvalidArgument(format!("shm: slot {i} out of range")))
    }

    /// Withdraws the registration at `addr`, then waits up to `wait` for initiators still copying
    /// to or from it. A registration that is not in the table is ignored. On timeout the slot is
    /// never reused (a stalled initiator still counts in it) and `Timeout` is returned.
    pub(crate) fn unregister(&self, addr: u64, wait: Duration) -> Result<()> {
        let Some(b) = sync::lock(&self.state).live.remove(&addr) else {
            return Ok(());
        };
        let s = self.slot(b.slot)?;
        s.seq.store(b.seq + 1, Ordering::SeqCst);
        if !drain(s, Instant::now() + wait) {
            tracing::warn!(addr, slot = b.slot, "shm: initiators still copying after {wait:?}; slot retired");
            return Err(Error::Timeout(wait));
        }
        sync::lock(&self.state).free.push(b.slot);
        Ok(())
    }

    /// Marks the table closed (initiators fail with a disconnect from now on) and waits up to
    /// `wait` for copies in flight. Returns false when some were still running. Closing again
    /// returns at once.
    pub(crate) fn close(&self, wait: Duration) -> bool {
        if self.view.header().closed.swap(1, Ordering::SeqCst) != 0 {
            return true;
        }
        let used = sync::lock(&self.state).next;
        let deadline = Instant::now() + wait;
        (0..used).filter_map(|i| self.view.slot(i)).all(|s| drain(s, deadline))
    }

    /// Number of live registrations.
    #[cfg(test)]
    pub(crate) fn live(&self) -> usize {
        sync::lock(&self.state).live.len()
    }
}

/// Waits until nobody copies through `s`, or `deadline`.
fn drain(s: &Slot, deadline: Instant) -> bool {
    let mut spins = 0u32;
    while s.inflight.load(Ordering::SeqCst) != 0 {
        if Instant::now() >= deadline {
            return false;
        }
        spins += 1;
        if spins < 100 {
            std::hint::spin_loop();
        } else if spins < 200 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    true
}

/// Why an initiator may not copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The target shut its transport down.
    Closed,
    /// The registration is gone (the descriptor is stale).
    Stale,
}

/// The initiator's view of a target's table.
#[derive(Debug)]
pub(crate) struct RemoteTable {
    view: View,
}

impl RemoteTable {
    /// Maps a table received as `fd`, checking that it is sealed, large enough and the one the
    /// descriptor announced (`slots`, `token`). `Err` says what does not match.
    pub(crate) fn open(fd: &OwnedFd, slots: u32, token: [u64; 2]) -> std::result::Result<RemoteTable, String> {
        if slots == 0 || slots > MAX_SLOTS {
            return Err(format!("published slot count {slots} is out of range"));
        }
        let seals = sys::seals(fd).map_err(|e| format!("the table is not a sealable memfd: {e}"))?;
        if !sys::is_size_sealed(seals) {
            return Err("the table is not sealed against shrinking".into());
        }
        let bytes = table_bytes(slots);
        let size = sys::file_size(fd).map_err(|e| format!("cannot stat the table: {e}"))?;
        if size < bytes as u64 {
            return Err(format!("the table has {size} bytes, {bytes} expected for {slots} slots"));
        }
        let map = Mapping::shared(fd, bytes).map_err(|e| format!("cannot map the table: {e}"))?;
        let view = View::new(map, slots).ok_or("table mapping too small")?;
        let h = view.header();
        let found = (
            h.magic.load(Ordering::Acquire),
            h.version.load(Ordering::Relaxed),
            h.slots.load(Ordering::Relaxed),
            [h.token[0].load(Ordering::Relaxed), h.token[1].load(Ordering::Relaxed)],
        );
        if found != (MAGIC, VERSION, u64::from(slots), token) {
            return Err(format!(
                "the table does not match the descriptor (magic {:#x}, version {}, {} slots): \
                 the target restarted its shm transport",
                found.0, found.1, found.2
            ));
        }
        Ok(RemoteTable { view })
    }

    /// True once the target shut its transport down.
    pub(crate) fn is_closed(&self) -> bool {
        self.view.header().closed.load(Ordering::SeqCst) != 0
    }

    /// Counts this copy in `b`'s slot if the registration is still live; the lease keeps the
    /// target's unregistration waiting until it is dropped.
    pub(crate) fn acquire(&self, b: &BufRef) -> std::result::Result<Lease<'_>, Refusal> {
        let s = self.view.slot(b.slot).ok_or(Refusal::Stale)?;
        s.inflight.fetch_add(1, Ordering::SeqCst);
        let lease = Lease { slot: s };
        if self.view.header().closed.load(Ordering::SeqCst) != 0 {
            return Err(Refusal::Closed);
        }
        let live = s.seq.load(Ordering::SeqCst) == b.seq
            && b.seq % 2 == 1
            && s.addr.load(Ordering::Relaxed) == b.addr
            && s.len.load(Ordering::Relaxed) == b.len;
        if !live {
            return Err(Refusal::Stale);
        }
        Ok(lease)
    }
}

/// One copy counted in a target's slot; uncounted on drop.
#[derive(Debug)]
pub(crate) struct Lease<'a> {
    slot: &'a Slot,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("seq", &self.seq.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.slot.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    /// Opens the table the way an initiator does: through `/proc/<pid>/fd/<n>`.
    fn remote_of(t: &OwnerTable) -> RemoteTable {
        let dir = sys::open_proc_dir(std::process::id() as i32).unwrap();
        let fd = sys::open_at(&dir, &format!("fd/{}", t.fd_number()), libc::O_RDWR).unwrap();
        RemoteTable::open(&fd, t.slots(), t.token()).unwrap()
    }

    #[test]
    fn registrations_are_visible_and_revocable() {
        let t = OwnerTable::create(8).unwrap();
        let r = remote_of(&t);
        let a = t.register(0x10000, 4096).unwrap();
        let b = t.register(0x20000, 100).unwrap();
        assert_ne!(a.slot, b.slot);
        assert_eq!(a.seq % 2, 1);
        drop(r.acquire(&a).unwrap());
        // A mismatched length or sequence is stale.
        assert_eq!(r.acquire(&BufRef { len: 8192, ..a }).unwrap_err(), Refusal::Stale);
        assert_eq!(r.acquire(&BufRef { seq: a.seq + 2, ..a }).unwrap_err(), Refusal::Stale);
        assert_eq!(r.acquire(&BufRef { slot: 99, ..a }).unwrap_err(), Refusal::Stale);
        t.unregister(a.addr, Duration::from_secs(10)).unwrap();
        assert_eq!(r.acquire(&a).unwrap_err(), Refusal::Stale);
        // The slot is reused with a new sequence: the old descriptor entry stays stale.
        let again = t.register(0x10000, 4096).unwrap();
        assert_eq!(again.slot, a.slot);
        assert_ne!(again.seq, a.seq);
        assert_eq!(r.acquire(&a).unwrap_err(), Refusal::Stale);
        assert!(r.acquire(&again).is_ok());
        assert!(r.acquire(&b).is_ok());
        assert_eq!(t.live(), 2);
        // Unknown addresses are ignored.
        t.unregister(0x999, Duration::ZERO).unwrap();
    }

    #[test]
    fn unregister_waits_for_leases() {
        let t = Arc::new(OwnerTable::create(4).unwrap());
        let r = Arc::new(remote_of(&t));
        let b = t.register(0x4000, 64).unwrap();
        let released = Arc::new(AtomicBool::new(false));
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (r2, rel2) = (r.clone(), released.clone());
        let h = std::thread::spawn(move || {
            let lease = r2.acquire(&b).unwrap();
            held_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            rel2.store(true, Ordering::SeqCst);
            drop(lease);
        });
        held_rx.recv().unwrap();
        // While the lease is held a bounded wait times out and the slot is retired.
        assert!(matches!(t.unregister(b.addr, Duration::from_millis(1)), Err(Error::Timeout(_))));
        assert_eq!(r.acquire(&b).unwrap_err(), Refusal::Stale, "revoked before the wait");
        let c = t.register(0x8000, 64).unwrap();
        assert_ne!(c.slot, b.slot, "a retired slot is never reused");
        // A second registration: unregister returns only after the lease is gone.
        let (r3, t3) = (r.clone(), t.clone());
        let lease = r3.acquire(&c).unwrap();
        go_tx.send(()).unwrap();
        h.join().unwrap();
        let flag = Arc::new(AtomicBool::new(false));
        let f2 = flag.clone();
        let waiter = std::thread::spawn(move || {
            t3.unregister(c.addr, Duration::from_secs(60)).unwrap();
            f2.load(Ordering::SeqCst)
        });
        std::thread::yield_now();
        flag.store(true, Ordering::SeqCst);
        drop(lease);
        assert!(waiter.join().unwrap(), "unregister returned while a copy was still counted");
        assert!(released.load(Ordering::SeqCst));
    }

    #[test]
    fn closing_refuses_new_copies() {
        let t = OwnerTable::create(4).unwrap();
        let r = remote_of(&t);
        let b = t.register(0x4000, 64).unwrap();
        assert!(!r.is_closed());
        assert!(t.close(Duration::from_secs(1)));
        assert!(r.is_closed());
        assert_eq!(r.acquire(&b).unwrap_err(), Refusal::Closed);
    }

    #[test]
    fn capacity_is_a_typed_error() {
        let t = OwnerTable::create(2).unwrap();
        t.register(0x1000, 1).unwrap();
        t.register(0x2000, 1).unwrap();
        assert!(matches!(t.register(0x3000, 1), Err(Error::NoSpace(_))));
        assert!(matches!(t.register(0x1000, 1), Err(Error::AlreadyExists(_))));
        t.unregister(0x1000, Duration::ZERO).unwrap();
        t.register(0x3000, 1).unwrap();
    }

    #[test]
    fn open_checks_identity_size_and_seals() {
        let t = OwnerTable::create(4).unwrap();
        let dir = sys::open_proc_dir(std::process::id() as i32).unwrap();
        let fd = sys::open_at(&dir, &format!("fd/{}", t.fd_number()), libc::O_RDWR).unwrap();
        assert!(RemoteTable::open(&fd, 4, [t.token()[0] ^ 1, t.token()[1]]).unwrap_err().contains("does not match"));
        assert!(RemoteTable::open(&fd, 3, t.token()).is_err(), "slot count differs");
        assert!(RemoteTable::open(&fd, 100_000, t.token()).unwrap_err().contains("bytes"));
        assert!(RemoteTable::open(&fd, 0, t.token()).is_err());
        // A plain file is not sealed.
        let plain = tempfile_fd();
        assert!(RemoteTable::open(&plain, 4, t.token()).is_err());
    }

    fn tempfile_fd() -> OwnedFd {
        let path = std::env::temp_dir().join(format!("mooncake-shm-table-test-{}", std::process::id()));
        let f = std::fs::File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.set_len(table_bytes(4) as u64).unwrap();
        let _ = std::fs::remove_file(&path);
        f.into()
    }

    #[test]
    fn buffer_ranges() {
        let b = BufRef { addr: 0x1000, len: 0x1000, slot: 0, seq: 1 };
        assert!(b.contains(0x1000, 0x1000));
        assert!(b.contains(0x1fff, 1));
        assert!(!b.contains(0x1fff, 2));
        assert!(!b.contains(0xfff, 1));
        assert!(!b.contains(0x1000, 0), "zero length");
        assert!(!b.contains(u64::MAX, 2), "overflow");
        assert_eq!(table_bytes(1), 4096);
        assert_eq!(table_bytes(16384), 64 + 16384 * 64 + 4096 - 64);
    }
}
