//! [`Region`]: the mapped device and the shared header every process keeps its state in: who uses the region
//! (owners), which ranges are allocated, and which are published to peers of the `cxl` transport.
//!
//! # Locking
//! Changes to the tables are made under the region lock, taken in three steps:
//! 1. a mutex, for the threads of this process;
//! 2. an open-file-description lock (`F_OFD_SETLKW`) on byte 0 of the device file, for the processes of this host:
//!    the kernel releases it when its holder dies;
//! 3. the header's lock word, taken with a compare-and-swap from 0 to the holder's token (high half of its host
//!    tag, low half its pid), for processes on other hosts sharing the device. This assumes the device keeps CPU
//!    atomics coherent across hosts (CXL 3.x shared memory with back-invalidation). A token of this host found
//!    while we hold the file lock belongs to a process that died holding it (a live one would hold the file lock):
//!    it is taken over. A token of another host is waited for up to the lock timeout, then reported with its
//!    holder ([`CxlError::LockTimeout`]).
//!
//! Accesses of the `cxl` transport take no lock: an initiator raises a slot's in-flight count, checks that the
//! slot still carries the publication its descriptor names and that the owner is live, copies, and lowers the
//! count; withdrawing a publication bumps its sequence number first and then waits for the count to drop to
//! zero (sequentially consistent atomics on both sides, as in the shm transport's registration table).

use std::fs::OpenOptions;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mooncake_core::{Error, Result, sync};

use crate::config::{Backing, CxlConfig, DEFAULT_MAX_ALLOCATIONS, DEFAULT_MAX_BUFFERS, DEFAULT_MAX_OWNERS, inspect};
use crate::error::CxlError;
use crate::layout::*;
use crate::sys::{self, Identity, SharedMapping};

/// What an owner table entry stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum OwnerKind {
    /// A process's allocations (one per mapping of the region).
    Process = 1,
    /// An engine's publications (one per started `cxl` transport).
    Engine = 2,
}

/// One entry of the owner table, by index and generation (a reused entry has a new generation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OwnerRef {
    /// Index in the owner table.
    pub index: u32,
    /// Generation of the entry when it was taken.
    pub generation: u64,
}

/// What the owner table says about an owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerStatus {
    /// Registered and not retired: which process it is.
    Live(Identity),
    /// Retired, reclaimed, or never existed.
    Gone,
}

/// A range published in the publication table: peers name it by slot and sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publication {
    /// Slot index.
    pub slot: u32,
    /// Sequence number while published (odd).
    pub seq: u64,
}

/// Why [`Region::access`] refused a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The slot no longer carries that publication (withdrawn, or reused for another one).
    Withdrawn,
    /// The range is not inside the published range.
    OutOfRange,
    /// The owner that published it retired or was reclaimed.
    OwnerGone,
}

/// A granted access: the slot's in-flight count stays raised (so withdrawing waits) until this is dropped.
#[derive(Debug)]
pub struct SlotAccess<'a> {
    count: &'a AtomicU64,
}

impl Drop for SlotAccess<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The mapped region and its header.
#[derive(Debug)]
pub struct Region {
    path: PathBuf,
    fd: Arc<OwnedFd>,
    file_id: (u64, u64),
    map: SharedMapping,
    map_len: u64,
    layout: Layout,
    id: u128,
    flush: bool,
    lock_timeout: Duration,
    owner_timeout: Option<Duration>,
    local: Mutex<()>,
    /// The file lock is unavailable on this file system: only the lock word protects the tables.
    no_file_lock: AtomicBool,
    me: Identity,
    owner: OwnerRef,
}

/// Held while the tables may be changed.
struct Locked<'a> {
    region: &'a Region,
    file_locked: bool,
    _local: MutexGuard<'a, ()>,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let r = self.region;
        if r.flush {
            crate::flush::write_back(r.base() + r.layout.owners_offset, r.layout.data_offset - r.layout.owners_offset);
        }
        r.word(H_LOCK).store(0, Ordering::Release);
        if r.flush {
            crate::flush::write_back(r.base() + H_LOCK, 8);
        }
        if self.file_locked {
            if let Err(e) = sys::ofd_lock(r.fd.as_fd(), false) {
                tracing::warn!(path = %r.path.display(), error = %e, "releasing the CXL region file lock failed");
            }
        }
    }
}

/// The largest alignment an allocation may ask for: the mapping starts at a multiple of it.
pub const MAX_ALIGNMENT: u64 = 1 << 30;

impl Region {
    /// Opens, maps and checks (or initializes) the region `config` names, and registers this process as an owner.
    pub fn open(config: &CxlConfig) -> std::result::Result<Arc<Region>, CxlError> {
        let path = config.path.as_path();
        if let Some(g) = config.granularity {
            Layout::check_settings(path, g)?;
        }
        let backing = inspect(path, config.size.is_some())?;
        let (derived, default_granularity) = match &backing {
            Backing::File { len } => (Some(*len), sys::page_size() as u64),
            Backing::Dax { size, align, .. } => (*size, align.unwrap_or(2 << 20).max(2 << 20)),
        };
        let size = match (config.size, derived) {
            (Some(want), Some(have)) if have < want => {
                return Err(CxlError::TooSmall {
                    path: path.to_path_buf(),
                    have,
                    need: want,
                    what: "the configured region size (MC_CXL_DEV_SIZE)".into(),
                });
            }
            (Some(want), _) => want,
            (None, Some(have)) if have > 0 => have,
            (None, _) => {
                return Err(CxlError::SizeUnknown {
                    path: path.to_path_buf(),
                    reason: "the file is empty and no size is configured".into(),
                });
            }
        };
        if size < HEADER_BYTES * 2 {
            return Err(CxlError::TooSmall {
                path: path.to_path_buf(),
                have: size,
                need: HEADER_BYTES * 2,
                what: "the region header and one page of memory".into(),
            });
        }
        let file =
            OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(path).map_err(|e| match e
                .raw_os_error()
            {
                Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
                    CxlError::PermissionDenied { path: path.to_path_buf(), reason: e.to_string() }
                }
                Some(libc::ENOENT) => CxlError::PathMissing { path: path.to_path_buf() },
                Some(libc::EISDIR) => CxlError::NotMappable { path: path.to_path_buf(), reason: e.to_string() },
                _ => CxlError::io(path, "open", e),
            })?;
        let fd = OwnedFd::from(file);
        let file_id = sys::file_id(fd.as_fd()).map_err(|e| CxlError::io(path, "fstat", e))?;
        let len = usize::try_from(size).map_err(|_| CxlError::BadValue {
            name: "MC_CXL_DEV_SIZE".into(),
            value: size.to_string(),
            reason: "does not fit the address space".into(),
        })?;
        let map = sys::map_shared_aligned(fd.as_fd(), len, MAX_ALIGNMENT as usize).map_err(|e| {
            CxlError::NotMappable { path: path.to_path_buf(), reason: format!("mmap of {size} bytes, shared: {e}") }
        })?;
        let mut region = Region {
            path: path.to_path_buf(),
            fd: Arc::new(fd),
            file_id,
            map,
            map_len: size,
            // Until the header is read: the header page alone.
            layout: Layout::header_only(size),
            id: 0,
            flush: config.flush,
            lock_timeout: config.lock_timeout,
            owner_timeout: config.owner_timeout,
            local: Mutex::new(()),
            no_file_lock: AtomicBool::new(false),
            me: Identity::current(),
            owner: OwnerRef { index: 0, generation: 0 },
        };
        let size_is_upper_bound = derived.is_some() && config.size.is_none();
        let (layout, id) = region.init_or_check(config, size, size_is_upper_bound, default_granularity)?;
        region.layout = layout;
        region.id = id;
        region.owner = region.take_owner(OwnerKind::Process)?;
        tracing::debug!(path = %path.display(), base = region.base(), size, ?layout, "CXL region mapped");
        let region = Arc::new(region);
        start_heartbeat(&region);
        Ok(region)
    }

    /// Reads and checks the header, initializing a fresh (all-zero) region, or one that is not ours when the
    /// config says to.
    fn init_or_check(
        &self,
        config: &CxlConfig,
        size: u64,
        size_is_upper_bound: bool,
        default_granularity: u64,
    ) -> std::result::Result<(Layout, u128), CxlError> {
        let path = self.path.as_path();
        let start = Instant::now();
        loop {
            if self.flush {
                crate::flush::invalidate(self.base(), HEADER_BYTES);
            }
            let magic = self.word(H_MAGIC).load(Ordering::Acquire);
            match magic {
                MAGIC => return self.check_header(config, size, size_is_upper_bound),
                MAGIC_FORMATTING => {
                    if start.elapsed() > config.lock_timeout {
                        return Err(CxlError::CorruptHeader {
                            path: path.to_path_buf(),
                            reason: format!(
                                "another process began initializing the region and did not finish within {} ms",
                                config.lock_timeout.as_millis()
                            ),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                0 if self.header_page_is_zero() || config.format_foreign => {
                    if self
                        .word(H_MAGIC)
                        .compare_exchange(0, MAGIC_FORMATTING, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                    {
                        return self.format(config, size, default_granularity);
                    }
                }
                other if config.format_foreign => {
                    if self
                        .word(H_MAGIC)
                        .compare_exchange(other, MAGIC_FORMATTING, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                    {
                        tracing::warn!(path = %path.display(), "initializing a CXL region that held other data (MC_CXL_FORMAT=1)");
                        return self.format(config, size, default_granularity);
                    }
                }
                other => {
                    return Err(CxlError::ForeignHeader {
                        path: path.to_path_buf(),
                        found: if other == 0 {
                            "its first word is 0 but the rest of the first page is not".into()
                        } else {
                            format!("first 8 bytes {:02x?}", other.to_le_bytes())
                        },
                    });
                }
            }
        }
    }

    fn header_page_is_zero(&self) -> bool {
        (0..HEADER_BYTES).step_by(8).all(|off| self.word(off).load(Ordering::Relaxed) == 0)
    }

    /// Writes a fresh header (the caller swapped the magic to [`MAGIC_FORMATTING`]).
    fn format(
        &self,
        config: &CxlConfig,
        size: u64,
        default_granularity: u64,
    ) -> std::result::Result<(Layout, u128), CxlError> {
        let path = self.path.as_path();
        let granularity = config.granularity.unwrap_or(default_granularity);
        Layout::check_settings(path, granularity)?;
        let layout = Layout::compute(
            size,
            granularity,
            config.max_owners.unwrap_or(DEFAULT_MAX_OWNERS),
            config.max_buffers.unwrap_or(DEFAULT_MAX_BUFFERS),
            config.max_allocations.unwrap_or(DEFAULT_MAX_ALLOCATIONS),
        )
        .ok_or_else(|| CxlError::BadValue {
            name: "table sizes".into(),
            value: format!("{config:?}"),
            reason: "the header tables overflow".into(),
        });
        let layout = match layout {
            Ok(l) if l.data_offset.saturating_add(granularity) <= size => l,
            Ok(l) => {
                self.word(H_MAGIC).store(0, Ordering::SeqCst);
                return Err(CxlError::TooSmall {
                    path: path.to_path_buf(),
                    have: size,
                    need: l.data_offset + granularity,
                    what: format!("a {} byte header and one {granularity} byte allocation", l.data_offset),
                });
            }
            Err(e) => {
                self.word(H_MAGIC).store(0, Ordering::SeqCst);
                return Err(e);
            }
        };
        // Everything after the magic, up to the data, starts out zero (a sparse file is zero already; a device
        // being reformatted is not).
        for off in (8..layout.data_offset).step_by(8) {
            let w = self.word(off);
            if w.load(Ordering::Relaxed) != 0 {
                w.store(0, Ordering::Relaxed);
            }
        }
        let id = loop {
            let id = sys::random_u128();
            if id != 0 {
                break id;
            }
        };
        let words = layout.words(id);
        for (i, w) in words.iter().enumerate() {
            self.word(H_VERSION + 8 * i as u64).store(*w, Ordering::Relaxed);
        }
        self.word(H_CHECKSUM).store(checksum(&words), Ordering::Relaxed);
        if self.flush {
            crate::flush::write_back(self.base(), layout.data_offset);
        }
        self.word(H_MAGIC).store(MAGIC, Ordering::Release);
        if self.flush {
            crate::flush::write_back(self.base(), 8);
        }
        tracing::info!(path = %path.display(), size, granularity, data_offset = layout.data_offset, "initialized CXL region");
        Ok((layout, id))
    }

    /// Checks an initialized header against what this process asks for.
    fn check_header(
        &self,
        config: &CxlConfig,
        size: u64,
        size_is_upper_bound: bool,
    ) -> std::result::Result<(Layout, u128), CxlError> {
        let path = self.path.as_path();
        let words: Vec<u64> = (0..12).map(|i| self.word(H_VERSION + 8 * i).load(Ordering::Acquire)).collect();
        let mismatch = |field: &'static str, found: u64, expected: u64| CxlError::HeaderMismatch {
            path: path.to_path_buf(),
            field,
            found: found.to_string(),
            expected: expected.to_string(),
        };
        if words[0] != VERSION {
            return Err(mismatch("version", words[0], VERSION));
        }
        let stored = self.word(H_CHECKSUM).load(Ordering::Acquire);
        if checksum(&words) != stored {
            return Err(CxlError::CorruptHeader {
                path: path.to_path_buf(),
                reason: format!("checksum {stored:#x} does not match the header words ({:#x})", checksum(&words)),
            });
        }
        let to_u32 = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        let header = Layout {
            region_size: words[1],
            granularity: words[2],
            max_owners: to_u32(words[3]),
            max_buffers: to_u32(words[4]),
            max_allocations: to_u32(words[5]),
            owners_offset: words[6],
            buffers_offset: words[7],
            allocs_offset: words[8],
            data_offset: words[9],
        };
        let id = u128::from(words[10]) | (u128::from(words[11]) << 64);
        let region_size_ok = if size_is_upper_bound { header.region_size <= size } else { header.region_size == size };
        if !region_size_ok {
            return Err(mismatch("region_size", header.region_size, size));
        }
        let checks = [
            ("granularity", config.granularity, header.granularity),
            ("max_owners", config.max_owners.map(u64::from), u64::from(header.max_owners)),
            ("max_buffers", config.max_buffers.map(u64::from), u64::from(header.max_buffers)),
            ("max_allocations", config.max_allocations.map(u64::from), u64::from(header.max_allocations)),
        ];
        for (field, want, found) in checks {
            if let Some(want) = want {
                if want != found {
                    return Err(mismatch(field, found, want));
                }
            }
        }
        let expected = Layout::compute(
            header.region_size,
            header.granularity,
            header.max_owners,
            header.max_buffers,
            header.max_allocations,
        );
        if expected != Some(header)
            || !header.granularity.is_power_of_two()
            || header.data_offset >= header.region_size
            || header.granularity > MAX_ALIGNMENT
        {
            return Err(CxlError::CorruptHeader {
                path: path.to_path_buf(),
                reason: format!("table offsets do not follow from the sizes ({header:?})"),
            });
        }
        Ok((header, id))
    }

    // ---- addresses ---------------------------------------------------------------------------------------

    /// The device path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the region starts in this process (upstream's `cxl_base_addr`).
    pub fn base(&self) -> u64 {
        self.map.addr() as u64
    }

    /// Bytes of the region, header included.
    pub fn size(&self) -> u64 {
        self.layout.region_size
    }

    /// The region's layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The random id chosen when the region was initialized: equal ids mean the same region, whatever path a
    /// host names it by.
    pub fn id(&self) -> u128 {
        self.id
    }

    /// Whether accesses flush CPU caches (`MC_CXL_FLUSH`).
    pub fn flushes(&self) -> bool {
        self.flush
    }

    /// The open device file (shared with exported handles).
    pub fn fd(&self) -> &Arc<OwnedFd> {
        &self.fd
    }

    /// Device and inode of the device file.
    pub fn file_id(&self) -> (u64, u64) {
        self.file_id
    }

    /// This process's owner entry (its allocations).
    pub fn process_owner(&self) -> OwnerRef {
        self.owner
    }

    /// True when `[addr, addr+len)` lies inside the mapping.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.base() && addr.checked_add(len).is_some_and(|end| end <= self.base() + self.size())
    }

    /// The offset of `[addr, addr+len)` when it lies inside the allocatable part of the mapping.
    pub fn offset_of(&self, addr: u64, len: u64) -> Option<u64> {
        let off = addr.checked_sub(self.base())?;
        self.data_range_ok(off, len).then_some(off)
    }

    /// The address of `[offset, offset+len)` when it lies inside the allocatable part of the region.
    pub fn addr_of(&self, offset: u64, len: u64) -> Option<u64> {
        self.data_range_ok(offset, len).then(|| self.base() + offset)
    }

    fn data_range_ok(&self, off: u64, len: u64) -> bool {
        off >= self.layout.data_offset && off.checked_add(len).is_some_and(|end| end <= self.layout.region_size)
    }

    /// The header word at byte `off`.
    fn word(&self, off: u64) -> &AtomicU64 {
        assert!(off % 8 == 0 && off + 8 <= self.map_len, "header word {off} out of range");
        // SAFETY: `off` is 8-aligned and inside the mapping (asserted), which lives as long as
        // `self` (the returned reference borrows it). The mapping is page aligned, so the word is 8-aligned.
        // This process touches header memory only through atomics; other processes sharing the region do the same.
        unsafe { &*((self.base() + off) as *const AtomicU64) }
    }

    fn owner_word(&self, i: u32, field: u64) -> &AtomicU64 {
        self.word(self.layout.owners_offset + u64::from(i) * OWNER_BYTES + field)
    }

    fn slot_word(&self, i: u32, field: u64) -> &AtomicU64 {
        self.word(self.layout.buffers_offset + u64::from(i) * SLOT_BYTES + field)
    }

    fn alloc_word(&self, i: u32, field: u64) -> &AtomicU64 {
        self.word(self.layout.allocs_offset + u64::from(i) * ALLOC_BYTES + field)
    }

    // ---- the lock ----------------------------------------------------------------------------------------

    fn lock(&self) -> std::result::Result<Locked<'_>, CxlError> {
        let local = sync::lock(&self.local);
        let mut file_locked = false;
        if !self.no_file_lock.load(Ordering::Relaxed) {
            match sys::ofd_lock(self.fd.as_fd(), true) {
                Ok(()) => file_locked = true,
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e,
                        "file locks are unavailable on the CXL device; relying on the header lock word alone");
                    self.no_file_lock.store(true, Ordering::Relaxed);
                }
            }
        }
        match self.take_lock_word(file_locked) {
            Ok(()) => {
                if self.flush {
                    let l = &self.layout;
                    crate::flush::invalidate(self.base() + l.owners_offset, l.data_offset - l.owners_offset);
                }
                Ok(Locked { region: self, file_locked, _local: local })
            }
            Err(e) => {
                if file_locked {
                    let _ = sys::ofd_lock(self.fd.as_fd(), false);
                }
                Err(e)
            }
        }
    }

    /// Step 3 of the lock: the header's lock word (see the module docs).
    fn take_lock_word(&self, file_locked: bool) -> std::result::Result<(), CxlError> {
        const HOST: u64 = 0xFFFF_FFFF_0000_0000;
        let mine = (self.me.host & HOST) | u64::from(self.me.pid);
        let word = self.word(H_LOCK);
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if self.flush {
                crate::flush::invalidate(self.base() + H_LOCK, 8);
            }
            let holder = match word.compare_exchange(0, mine, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(holder) => holder,
            };
            let pid = (holder & 0xFFFF_FFFF) as u32;
            // Holding the file lock, a token of this host is a dead holder's (a live one holds the file lock);
            // without the file lock, only one whose pid no longer exists is. A token of another host is a dead
            // holder's when that process's heartbeat stopped for the owner timeout.
            let stale = if holder & HOST == mine & HOST {
                file_locked || !Path::new(&format!("/proc/{pid}")).exists()
            } else {
                self.silent_since(HOST, holder & HOST, pid).is_some()
            };
            if stale && word.compare_exchange(holder, mine, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                tracing::warn!(path = %self.path.display(), pid, "took over the CXL region lock of a dead process");
                return Ok(());
            }
            if start.elapsed() > self.lock_timeout {
                return Err(CxlError::LockTimeout {
                    path: self.path.clone(),
                    holder: format!("host tag {:#x} pid {pid}", holder >> 32),
                    waited_ms: self.lock_timeout.as_millis() as u64,
                });
            }
            spins += 1;
            if spins < 100 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    // ---- owners ------------------------------------------------------------------------------------------

    /// Takes an owner table entry for this process (reclaiming entries of dead processes of this host first).
    pub fn register_owner(&self, kind: OwnerKind) -> Result<OwnerRef> {
        Ok(self.take_owner(kind)?)
    }

    fn take_owner(&self, kind: OwnerKind) -> std::result::Result<OwnerRef, CxlError> {
        let _l = self.lock()?;
        self.reclaim_locked();
        let free = (0..self.layout.max_owners).find(|i| self.owner_word(*i, O_STATE).load(Ordering::Relaxed) & 1 == 0);
        let Some(index) = free else {
            return Err(CxlError::TableFull { path: self.path.clone(), table: "owner", slots: self.layout.max_owners });
        };
        let generation = (self.owner_word(index, O_STATE).load(Ordering::Relaxed) >> 1) + 1;
        self.owner_word(index, O_HOST).store(self.me.host, Ordering::Relaxed);
        self.owner_word(index, O_PID).store(u64::from(self.me.pid), Ordering::Relaxed);
        self.owner_word(index, O_START).store(self.me.start, Ordering::Relaxed);
        self.owner_word(index, O_KIND).store(kind as u64, Ordering::Relaxed);
        self.owner_word(index, O_BEAT).store(now_ms(), Ordering::Relaxed);
        self.owner_word(index, O_STATE).store(generation << 1 | 1, Ordering::SeqCst);
        Ok(OwnerRef { index, generation })
    }

    /// Retires an owner: its publications are refused from now on. Idempotent.
    pub fn retire_owner(&self, owner: OwnerRef) {
        if owner.index < self.layout.max_owners {
            let live = owner.generation << 1 | 1;
            let _ = self.owner_word(owner.index, O_STATE).compare_exchange(
                live,
                owner.generation << 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            if self.flush {
                crate::flush::write_back(
                    self.base() + self.layout.owners_offset + u64::from(owner.index) * OWNER_BYTES,
                    8,
                );
            }
        }
    }

    /// What the owner table says about `owner`.
    pub fn owner_status(&self, owner: OwnerRef) -> OwnerStatus {
        if owner.index >= self.layout.max_owners {
            return OwnerStatus::Gone;
        }
        if self.owner_word(owner.index, O_STATE).load(Ordering::SeqCst) != owner.generation << 1 | 1 {
            return OwnerStatus::Gone;
        }
        OwnerStatus::Live(Identity {
            host: self.owner_word(owner.index, O_HOST).load(Ordering::Relaxed),
            pid: self.owner_word(owner.index, O_PID).load(Ordering::Relaxed) as u32,
            start: self.owner_word(owner.index, O_START).load(Ordering::Relaxed),
        })
    }

    /// How long the process `pid` of the host whose tag (masked by `mask`) is `host` has been silent, when that is
    /// longer than the owner timeout: judged by the freshest heartbeat among its live owner entries. `None` while
    /// it beats, when it never beat (no heartbeat word: an older version), when no entry names it, or when the
    /// timeout is off.
    fn silent_since(&self, mask: u64, host: u64, pid: u32) -> Option<Duration> {
        let timeout = self.owner_timeout?;
        let freshest = (0..self.layout.max_owners)
            .filter(|i| {
                self.owner_word(*i, O_STATE).load(Ordering::SeqCst) & 1 == 1
                    && self.owner_word(*i, O_HOST).load(Ordering::Relaxed) & mask == host
                    && self.owner_word(*i, O_PID).load(Ordering::Relaxed) == u64::from(pid)
            })
            .map(|i| self.owner_word(i, O_BEAT).load(Ordering::Acquire))
            .max()?;
        if freshest == 0 {
            return None;
        }
        let silent = Duration::from_millis(now_ms().saturating_sub(freshest));
        (silent > timeout).then_some(silent)
    }

    /// Writes this process's heartbeat into its owner entry.
    fn beat(&self) {
        if self.owner_word(self.owner.index, O_STATE).load(Ordering::Relaxed) == self.owner.generation << 1 | 1 {
            self.owner_word(self.owner.index, O_BEAT).store(now_ms(), Ordering::Release);
            if self.flush {
                let at = self.base() + self.layout.owners_offset + u64::from(self.owner.index) * OWNER_BYTES + O_BEAT;
                crate::flush::write_back(at, 8);
            }
        }
    }

    fn owner_live(&self, index_plus_one: u64, generation: u64) -> bool {
        index_plus_one != 0
            && index_plus_one <= u64::from(self.layout.max_owners)
            && self.owner_word((index_plus_one - 1) as u32, O_STATE).load(Ordering::SeqCst) == generation << 1 | 1
    }

    /// Under the lock: retires owners that are processes of this host that died (or engines of such processes),
    /// frees publication slots of retired owners once no initiator is inside them, and allocations of retired
    /// owners once no such slot overlaps them.
    fn reclaim_locked(&self) {
        let l = &self.layout;
        for i in 0..l.max_owners {
            let state = self.owner_word(i, O_STATE).load(Ordering::Relaxed);
            if state & 1 == 0 {
                continue;
            }
            let host = self.owner_word(i, O_HOST).load(Ordering::Relaxed);
            let pid = self.owner_word(i, O_PID).load(Ordering::Relaxed) as u32;
            let dead = if host == self.me.host {
                !Identity::alive(pid, self.owner_word(i, O_START).load(Ordering::Relaxed))
            } else {
                self.silent_since(u64::MAX, host, pid).is_some()
            };
            if dead {
                tracing::info!(path = %self.path.display(), host, pid, owner = i, "reclaiming the CXL region entries of a dead process");
                self.owner_word(i, O_STATE).store(state & !1, Ordering::SeqCst);
            }
        }
        let mut busy: Vec<(u64, u64)> = Vec::new();
        for s in 0..l.max_buffers {
            let owner = self.slot_word(s, S_OWNER).load(Ordering::Relaxed);
            if owner == 0 || self.owner_live(owner, self.slot_word(s, S_OWNER_GEN).load(Ordering::Relaxed)) {
                continue;
            }
            let seq = self.slot_word(s, S_SEQ);
            let now = seq.load(Ordering::SeqCst);
            if now & 1 == 1 {
                let _ = seq.compare_exchange(now, now + 1, Ordering::SeqCst, Ordering::SeqCst);
            }
            if self.slot_word(s, S_INFLIGHT).load(Ordering::SeqCst) == 0 {
                self.slot_word(s, S_OWNER).store(0, Ordering::Relaxed);
            } else {
                busy.push((
                    self.slot_word(s, S_OFFSET).load(Ordering::Relaxed),
                    self.slot_word(s, S_LEN).load(Ordering::Relaxed),
                ));
            }
        }
        for a in 0..l.max_allocations {
            let len = self.alloc_word(a, A_LEN).load(Ordering::Relaxed);
            if len == 0 {
                continue;
            }
            let owner = self.alloc_word(a, A_OWNER).load(Ordering::Relaxed);
            if owner == SHARED_OWNER || self.owner_live(owner, self.alloc_word(a, A_OWNER_GEN).load(Ordering::Relaxed))
            {
                continue;
            }
            let start = self.alloc_word(a, A_START).load(Ordering::Relaxed);
            let overlaps = busy.iter().any(|(o, n)| *o < start + len && start < o + n);
            if !overlaps {
                self.alloc_word(a, A_LEN).store(0, Ordering::Relaxed);
            }
        }
    }

    // ---- allocations -------------------------------------------------------------------------------------

    /// Reserves `len` bytes (rounded up to the granularity) at an offset that is a multiple of `align` (a power of
    /// two, at most [`MAX_ALIGNMENT`]) for this process. Returns the offset.
    pub fn allocate(&self, len: u64, align: u64) -> Result<u64> {
        let g = self.layout.granularity;
        let need = len
            .checked_next_multiple_of(g)
            .filter(|n| *n > 0)
            .ok_or_else(|| Error::InvalidArgument(format!("allocation of {len} bytes")))?;
        let align = align.max(g);
        let _l = self.lock()?;
        let offset = match self.find_gap(need, align) {
            Ok(off) => off,
            Err(_) => {
                self.reclaim_locked();
                self.find_gap(need, align).map_err(Error::NoSpace)?
            }
        };
        let slot = (0..self.layout.max_allocations).find(|a| self.alloc_word(*a, A_LEN).load(Ordering::Relaxed) == 0);
        let Some(slot) = slot else {
            return Err(CxlError::TableFull {
                path: self.path.clone(),
                table: "allocation",
                slots: self.layout.max_allocations,
            }
            .into());
        };
        self.alloc_word(slot, A_START).store(offset, Ordering::Relaxed);
        self.alloc_word(slot, A_OWNER).store(u64::from(self.owner.index) + 1, Ordering::Relaxed);
        self.alloc_word(slot, A_OWNER_GEN).store(self.owner.generation, Ordering::Relaxed);
        self.alloc_word(slot, A_LEN).store(need, Ordering::Relaxed);
        Ok(offset)
    }

    /// The named area `tag` (a hash of its name): found in the allocation table, or reserved now with `len`
    /// bytes rounded up to the granularity (`0`: the largest free range). Returns `(offset, length)`. Named
    /// areas belong to no process: nothing reclaims or releases them (zeroing the header page does).
    pub fn reserve_shared(&self, tag: u64, len: u64) -> Result<(u64, u64)> {
        let g = self.layout.granularity;
        let _l = self.lock()?;
        let found = (0..self.layout.max_allocations).find(|a| {
            self.alloc_word(*a, A_LEN).load(Ordering::Relaxed) != 0
                && self.alloc_word(*a, A_OWNER).load(Ordering::Relaxed) == SHARED_OWNER
                && self.alloc_word(*a, A_OWNER_GEN).load(Ordering::Relaxed) == tag
        });
        if let Some(a) = found {
            return Ok((
                self.alloc_word(a, A_START).load(Ordering::Relaxed),
                self.alloc_word(a, A_LEN).load(Ordering::Relaxed),
            ));
        }
        self.reclaim_locked();
        let (offset, need) = if len == 0 {
            self.largest_gap(g).ok_or_else(|| {
                Error::NoSpace(format!("CXL region {}: no free range left for a shared area", self.path.display()))
            })?
        } else {
            let need = len
                .checked_next_multiple_of(g)
                .ok_or_else(|| Error::InvalidArgument(format!("shared area of {len} bytes")))?;
            (self.find_gap(need, g).map_err(Error::NoSpace)?, need)
        };
        let slot = (0..self.layout.max_allocations).find(|a| self.alloc_word(*a, A_LEN).load(Ordering::Relaxed) == 0);
        let Some(slot) = slot else {
            return Err(CxlError::TableFull {
                path: self.path.clone(),
                table: "allocation",
                slots: self.layout.max_allocations,
            }
            .into());
        };
        self.alloc_word(slot, A_START).store(offset, Ordering::Relaxed);
        self.alloc_word(slot, A_OWNER).store(SHARED_OWNER, Ordering::Relaxed);
        self.alloc_word(slot, A_OWNER_GEN).store(tag, Ordering::Relaxed);
        self.alloc_word(slot, A_LEN).store(need, Ordering::Relaxed);
        Ok((offset, need))
    }

    /// Live allocations (start, length), sorted by start.
    fn live_allocations(&self) -> Vec<(u64, u64)> {
        let mut live: Vec<(u64, u64)> = (0..self.layout.max_allocations)
            .filter_map(|a| {
                let len = self.alloc_word(a, A_LEN).load(Ordering::Relaxed);
                (len > 0).then(|| (self.alloc_word(a, A_START).load(Ordering::Relaxed), len))
            })
            .collect();
        live.sort_unstable();
        live
    }

    /// The largest free range, cut to multiples of `align` at both ends: `(offset, length)`.
    fn largest_gap(&self, align: u64) -> Option<(u64, u64)> {
        let l = &self.layout;
        let live = self.live_allocations();
        let mut cursor = l.data_offset;
        let mut best: Option<(u64, u64)> = None;
        let gaps = live.iter().map(|(s, n)| (*s, s.saturating_add(*n))).chain([(l.region_size, l.region_size)]);
        for (start, end) in gaps {
            if let Some(at) = cursor.checked_next_multiple_of(align) {
                let usable = start.saturating_sub(at) / align * align;
                if usable > 0 && best.is_none_or(|(_, n)| usable > n) {
                    best = Some((at, usable));
                }
            }
            cursor = cursor.max(end);
        }
        best
    }

    /// First fit over the gaps between live allocations.
    fn find_gap(&self, need: u64, align: u64) -> std::result::Result<u64, String> {
        let l = &self.layout;
        let live = self.live_allocations();
        let mut cursor = l.data_offset;
        let (mut free, mut largest) = (0u64, 0u64);
        let gaps = live.iter().map(|(s, n)| (*s, s.saturating_add(*n))).chain([(l.region_size, l.region_size)]);
        for (start, end) in gaps {
            if start > cursor {
                let gap = start - cursor;
                free += gap;
                largest = largest.max(gap);
                if let Some(at) = cursor.checked_next_multiple_of(align) {
                    if at.checked_add(need).is_some_and(|e| e <= start) {
                        return Ok(at);
                    }
                }
            }
            cursor = cursor.max(end);
        }
        Err(format!(
            "CXL region {}: no free range of {need} bytes aligned to {align} ({free} of {} bytes free, largest free \
             range {largest}, {} live allocations)",
            self.path.display(),
            l.data_bytes(),
            live.len()
        ))
    }

    /// Gives back the allocation of this process at `offset`.
    pub fn release(&self, offset: u64) -> Result<()> {
        let _l = self.lock()?;
        let owner = u64::from(self.owner.index) + 1;
        let slot = (0..self.layout.max_allocations).find(|a| {
            self.alloc_word(*a, A_LEN).load(Ordering::Relaxed) != 0
                && self.alloc_word(*a, A_START).load(Ordering::Relaxed) == offset
                && self.alloc_word(*a, A_OWNER).load(Ordering::Relaxed) == owner
                && self.alloc_word(*a, A_OWNER_GEN).load(Ordering::Relaxed) == self.owner.generation
        });
        match slot {
            Some(a) => {
                self.alloc_word(a, A_LEN).store(0, Ordering::Relaxed);
                Ok(())
            }
            None => Err(Error::NotFound(format!(
                "CXL region {}: no allocation of this process at offset {offset:#x} in the region header (reclaimed \
                 or never made)",
                self.path.display()
            ))),
        }
    }

    /// Live allocations of the region (all processes): `(offset, reserved length)`, sorted.
    pub fn allocations(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = (0..self.layout.max_allocations)
            .filter_map(|a| {
                let len = self.alloc_word(a, A_LEN).load(Ordering::Acquire);
                (len > 0).then(|| (self.alloc_word(a, A_START).load(Ordering::Relaxed), len))
            })
            .collect();
        v.sort_unstable();
        v
    }

    // ---- publications ------------------------------------------------------------------------------------

    /// Publishes `[offset, offset+len)` for `owner` (an engine): peers may access it until it is withdrawn.
    pub fn publish(&self, owner: OwnerRef, offset: u64, len: u64) -> Result<Publication> {
        if !self.data_range_ok(offset, len) || len == 0 {
            return Err(Error::InvalidArgument(format!(
                "CXL region {}: [{offset:#x}, +{len}) is not inside the allocatable part of the region",
                self.path.display()
            )));
        }
        let _l = self.lock()?;
        let find = || {
            (0..self.layout.max_buffers).find(|s| {
                self.slot_word(*s, S_OWNER).load(Ordering::Relaxed) == 0
                    && self.slot_word(*s, S_SEQ).load(Ordering::Relaxed) & 1 == 0
            })
        };
        let slot = match find() {
            Some(s) => s,
            None => {
                self.reclaim_locked();
                find().ok_or_else(|| CxlError::TableFull {
                    path: self.path.clone(),
                    table: "publication",
                    slots: self.layout.max_buffers,
                })?
            }
        };
        self.slot_word(slot, S_OFFSET).store(offset, Ordering::Relaxed);
        self.slot_word(slot, S_LEN).store(len, Ordering::Relaxed);
        self.slot_word(slot, S_OWNER).store(u64::from(owner.index) + 1, Ordering::Relaxed);
        self.slot_word(slot, S_OWNER_GEN).store(owner.generation, Ordering::Relaxed);
        let seq = self.slot_word(slot, S_SEQ).fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Publication { slot, seq })
    }

    /// Withdraws a publication: new accesses are refused at once; then waits up to `wait` for accesses in flight.
    /// `Timeout` leaves the slot retired (not reused while an initiator may still be inside).
    pub fn withdraw(&self, p: Publication, wait: Duration) -> Result<()> {
        if p.slot >= self.layout.max_buffers {
            return Ok(());
        }
        let seq = self.slot_word(p.slot, S_SEQ);
        match seq.compare_exchange(p.seq, p.seq + 1, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => {}
            // Withdrawn before (a call that timed out, or a reclaim after the owner retired): still wait below.
            Err(now) if now == p.seq + 1 => {}
            // Reused for another publication since: nothing of ours is left in it.
            Err(_) => return Ok(()),
        }
        let inflight = self.slot_word(p.slot, S_INFLIGHT);
        let deadline = Instant::now() + wait;
        let mut spins = 0u32;
        while inflight.load(Ordering::SeqCst) != 0 {
            if Instant::now() >= deadline {
                return Err(Error::Timeout(wait));
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        let _l = self.lock()?;
        if self.slot_word(p.slot, S_SEQ).load(Ordering::Relaxed) == p.seq + 1 {
            self.slot_word(p.slot, S_OWNER).store(0, Ordering::Relaxed);
        }
        Ok(())
    }

    /// An initiator's access to `[offset, offset+len)` of the publication `p` of `owner`: granted while the
    /// publication and its owner are live; withdrawing it waits until the returned guard is dropped.
    pub fn access(
        &self,
        p: Publication,
        owner: OwnerRef,
        offset: u64,
        len: u64,
    ) -> std::result::Result<SlotAccess<'_>, Refusal> {
        if p.slot >= self.layout.max_buffers {
            return Err(Refusal::Withdrawn);
        }
        let count = self.slot_word(p.slot, S_INFLIGHT);
        count.fetch_add(1, Ordering::SeqCst);
        let access = SlotAccess { count };
        // The owner first: a target that shut down (retired, then withdrew everything) reads as gone, not as a
        // stale buffer.
        if !self.owner_live(u64::from(owner.index) + 1, owner.generation) {
            return Err(Refusal::OwnerGone);
        }
        if self.slot_word(p.slot, S_SEQ).load(Ordering::SeqCst) != p.seq
            || self.slot_word(p.slot, S_OWNER).load(Ordering::Relaxed) != u64::from(owner.index) + 1
            || self.slot_word(p.slot, S_OWNER_GEN).load(Ordering::Relaxed) != owner.generation
        {
            return Err(Refusal::Withdrawn);
        }
        let start = self.slot_word(p.slot, S_OFFSET).load(Ordering::Relaxed);
        let plen = self.slot_word(p.slot, S_LEN).load(Ordering::Relaxed);
        let inside = offset >= start && offset.checked_add(len).is_some_and(|e| e <= start.saturating_add(plen));
        if !inside || !self.data_range_ok(offset, len) {
            return Err(Refusal::OutOfRange);
        }
        Ok(access)
    }
}

/// Milliseconds of `CLOCK_REALTIME` (heartbeats are compared across hosts: their clocks must agree to well within
/// the owner timeout, as NTP keeps them).
fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Beats for `region`'s process entry every quarter of the owner timeout (at most every second) until the region
/// is dropped. Processes of other hosts reclaim this process's entries once the beats stop.
fn start_heartbeat(region: &Arc<Region>) {
    let Some(timeout) = region.owner_timeout else { return };
    let every = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let weak = Arc::downgrade(region);
    let spawned = std::thread::Builder::new().name("mooncake-cxl-heartbeat".into()).spawn(move || {
        loop {
            std::thread::sleep(every);
            match weak.upgrade() {
                Some(region) => region.beat(),
                None => return,
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no CXL heartbeat thread: other hosts cannot tell when this process dies");
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // Allocations were given back by their holders (each holds the region); whatever is left is reclaimed
        // by the next process once this owner is retired.
        self.retire_owner(self.owner);
    }
}
