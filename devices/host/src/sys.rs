//! Thin wrappers over the Linux calls this crate needs (mmap, madvise, mbind, move_pages, memfd).
//!
//! Every raw call of the crate lives here, each behind a safe function whose arguments cannot break
//! memory safety; the rest of the crate only handles addresses as numbers and [`RawMapping`]s.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr;
use std::sync::OnceLock;

/// The base page size (`sysconf(_SC_PAGESIZE)`, 4096 when that fails).
pub(crate) fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf only reads a configuration value; it has no memory-safety preconditions.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if v > 0 && (v as usize).is_power_of_two() { v as usize } else { 4096 }
    })
}

/// The default huge page size from `/proc/meminfo` (`Hugepagesize:`), 2 MiB when unknown.
pub(crate) fn huge_page_size() -> usize {
    static HUGE: OnceLock<usize> = OnceLock::new();
    *HUGE.get_or_init(|| {
        std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| parse_huge_page_size(&s)).unwrap_or(2 << 20)
    })
}

/// Parses the `Hugepagesize:       2048 kB` line of `/proc/meminfo`.
pub(crate) fn parse_huge_page_size(meminfo: &str) -> Option<usize> {
    let line = meminfo.lines().find(|l| l.starts_with("Hugepagesize:"))?;
    let mut words = line.split_whitespace().skip(1);
    let value: usize = words.next()?.parse().ok()?;
    let unit = match words.next() {
        Some("kB") | Some("KB") => 1024,
        Some("MB") => 1 << 20,
        None => 1,
        Some(_) => return None,
    };
    let bytes = value.checked_mul(unit)?;
    bytes.is_power_of_two().then_some(bytes)
}

/// Rounds `v` up to a multiple of `align` (a power of two); `None` on overflow.
pub(crate) fn round_up(v: usize, align: usize) -> Option<usize> {
    debug_assert!(align.is_power_of_two());
    Some(v.checked_add(align - 1)? & !(align - 1))
}

/// A live `mmap` region owned by this value: unmapped on drop.
///
/// The address is kept as a number so the type is `Send + Sync`; whoever dereferences it must keep
/// the `RawMapping` alive for the duration of the access.
#[derive(Debug)]
pub(crate) struct RawMapping {
    addr: usize,
    len: usize,
}

impl RawMapping {
    /// Start of the mapping.
    pub(crate) fn addr(&self) -> usize {
        self.addr
    }

    /// Length of the mapping (a multiple of its page size).
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for RawMapping {
    fn drop(&mut self) {
        if let Err(e) = munmap(self.addr, self.len) {
            tracing::warn!(addr = self.addr, len = self.len, error = %e, "munmap failed");
        }
    }
}

fn munmap(addr: usize, len: usize) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: callers pass only ranges carved from a mapping this module created and that nothing else
    // references any more (RawMapping::drop owns its range; map_aligned trims ranges it never handed out).
    let rc = unsafe { libc::munmap(addr as *mut libc::c_void, len) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// How the pages of an anonymous mapping are backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AnonPages {
    /// Ordinary base pages.
    Normal,
    /// `MAP_HUGETLB` from the hugetlbfs pool (default huge page size).
    HugeTlb,
}

/// Maps `len` bytes of private anonymous memory whose start is a multiple of `align`.
///
/// `len` is rounded up to the page size of `pages`; `align` (a power of two) larger than that page
/// size is honoured by mapping `len + align` bytes and unmapping the unaligned head and tail.
pub(crate) fn map_anonymous(len: usize, align: usize, pages: AnonPages) -> io::Result<RawMapping> {
    let (granule, extra_flags) = match pages {
        AnonPages::Normal => (page_size(), 0),
        AnonPages::HugeTlb => (huge_page_size(), libc::MAP_HUGETLB),
    };
    let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "length plus alignment overflows the address space");
    let map_len = round_up(len.max(1), granule).ok_or_else(too_big)?;
    let align = align.max(granule);
    let over_len = map_len.checked_add(align - granule).ok_or_else(too_big)?;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra_flags;
    let base = mmap(over_len, libc::PROT_READ | libc::PROT_WRITE, flags, None)?;
    // From here on `whole` owns [base, base+over_len) and unmaps it if anything below fails.
    let whole = RawMapping { addr: base, len: over_len };
    let start = round_up(base, align).ok_or_else(too_big)?;
    let head = start - base;
    let tail = over_len - head - map_len;
    // Both trims are multiples of `granule` because base, start and map_len are.
    std::mem::forget(whole);
    let kept = RawMapping { addr: start, len: map_len };
    let trim = munmap(base, head).and_then(|()| munmap(start + map_len, tail));
    if let Err(e) = trim {
        // Give back what is left; `kept` unmaps its part on drop, the head/tail may leak (harmless).
        drop(kept);
        return Err(e);
    }
    Ok(kept)
}

/// Maps `len` bytes of `fd` shared and read-write.
pub(crate) fn map_shared_fd(fd: BorrowedFd<'_>, len: usize) -> io::Result<RawMapping> {
    map_shared_fd_at(fd, len, 0)
}

/// Maps `len` bytes of `fd` from byte `offset` (a multiple of the page size) shared and read-write.
pub(crate) fn map_shared_fd_at(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<RawMapping> {
    let map_len = round_up(len.max(1), page_size())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "length overflows the address space"))?;
    if offset % page_size() as u64 != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "file offset is not a multiple of the page size"));
    }
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset too large"))?;
    let addr = mmap_at(map_len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, Some(fd), offset)?;
    Ok(RawMapping { addr, len: map_len })
}

fn mmap(len: usize, prot: libc::c_int, flags: libc::c_int, fd: Option<BorrowedFd<'_>>) -> io::Result<usize> {
    mmap_at(len, prot, flags, fd, 0)
}

fn mmap_at(
    len: usize,
    prot: libc::c_int,
    flags: libc::c_int,
    fd: Option<BorrowedFd<'_>>,
    offset: libc::off_t,
) -> io::Result<usize> {
    let raw_fd = fd.map_or(-1, |f| f.as_raw_fd());
    // SAFETY: a null hint without MAP_FIXED lets the kernel pick an unused range, so no existing
    // memory is replaced; `raw_fd` is either -1 (anonymous) or borrowed and open for this call, and the
    // kernel checks `offset` against the file.
    let p = unsafe { libc::mmap(ptr::null_mut(), len, prot, flags, raw_fd, offset) };
    if p == libc::MAP_FAILED { Err(io::Error::last_os_error()) } else { Ok(p as usize) }
}

/// Asks for transparent huge pages on `mapping` (`madvise(MADV_HUGEPAGE)`).
pub(crate) fn madvise_hugepage(mapping: &RawMapping) -> io::Result<()> {
    // SAFETY: the range is exactly a live mapping owned by `mapping`; MADV_HUGEPAGE only changes
    // how the kernel backs it, never its contents or validity.
    let rc = unsafe { libc::madvise(mapping.addr as *mut libc::c_void, mapping.len, libc::MADV_HUGEPAGE) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// `MADV_POPULATE_WRITE` (Linux 5.14), written out for libc versions that lack the constant.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Bytes populated per `madvise` call: the call holds the process's mmap lock, which every `mmap` (a new
/// thread's stack, a large allocation) waits for; measured here, one call over 2 GiB held it ~0.6 s.
const POPULATE_CHUNK: usize = 32 << 20;

/// Faults in every page of `mapping` writable without changing its contents
/// (`madvise(MADV_POPULATE_WRITE)`, a chunk at a time); fails with EINVAL on kernels older than 5.14.
pub(crate) fn populate_write(mapping: &RawMapping) -> io::Result<()> {
    let mut done = 0;
    while done < mapping.len {
        let len = POPULATE_CHUNK.min(mapping.len - done);
        // SAFETY: the range lies inside a live mapping owned by `mapping`; MADV_POPULATE_WRITE only
        // faults pages in (as a write fault would) and never changes their contents, so concurrent
        // readers and writers of the memory are unaffected.
        let rc = unsafe { libc::madvise((mapping.addr + done) as *mut libc::c_void, len, MADV_POPULATE_WRITE) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        done += len;
    }
    Ok(())
}

/// Binds `mapping` to NUMA node `node` (`mbind(MPOL_BIND)`), before any page is touched.
pub(crate) fn mbind(mapping: &RawMapping, node: u32) -> io::Result<()> {
    let bits = libc::c_ulong::BITS as usize;
    let node = node as usize;
    let mut mask: Vec<libc::c_ulong> = vec![0; node / bits + 1];
    mask[node / bits] |= 1 << (node % bits);
    // The kernel reads `maxnode - 1` bits.
    let maxnode = (mask.len() * bits + 1) as libc::c_ulong;
    // SAFETY: the range is a live mapping owned by `mapping`; `mask` outlives the call and holds the
    // `maxnode - 1` bits the kernel reads; mbind changes placement policy only, not contents.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            mapping.addr as *mut libc::c_void,
            mapping.len as libc::c_ulong,
            libc::MPOL_BIND as libc::c_ulong,
            mask.as_ptr(),
            maxnode,
            0 as libc::c_uint,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// The NUMA node holding the page that contains `addr`, without touching or faulting it in.
///
/// Uses `move_pages(0, 1, page, NULL, status, 0)`, which only reports. `None` when the page is not
/// faulted in yet, the address is not mapped, or the kernel has no NUMA support.
pub(crate) fn page_node(addr: u64) -> Option<u32> {
    let page = (addr as usize) & !(page_size() - 1);
    let mut pages: [*mut libc::c_void; 1] = [page as *mut libc::c_void];
    let mut status: [libc::c_int; 1] = [-1];
    // SAFETY: with `nodes == NULL` move_pages moves nothing and only writes one status per page into
    // `status`; `pages` and `status` are live arrays of the declared count (1). The kernel validates
    // the page address itself and reports -EFAULT/-ENOENT in `status` for unmapped or absent pages.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0 as libc::c_int,
            1 as libc::c_ulong,
            pages.as_mut_ptr(),
            ptr::null::<libc::c_int>(),
            status.as_mut_ptr(),
            0 as libc::c_int,
        )
    };
    if rc == 0 && status[0] >= 0 { Some(status[0] as u32) } else { None }
}

/// Creates an anonymous, close-on-exec memory file (`memfd_create`).
pub(crate) fn memfd_create(name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create, is open, and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Copies `len` bytes between two ranges that may overlap (`memmove`).
///
/// # Safety
/// `src` must be valid for reads and `dst` valid for writes of `len` bytes for the whole call.
pub(crate) unsafe fn copy_bytes(src: *const u8, dst: *mut u8, len: usize) {
    // SAFETY: validity of both ranges is the caller's contract; `ptr::copy` allows overlap.
    unsafe { ptr::copy(src, dst, len) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_huge_page_size() {
        let s = "MemTotal: 1 kB\nHugePages_Total:       0\nHugepagesize:       2048 kB\nHugetlb: 0 kB\n";
        assert_eq!(parse_huge_page_size(s), Some(2 << 20));
        assert_eq!(parse_huge_page_size("Hugepagesize: 1048576 kB\n"), Some(1 << 30));
        assert_eq!(parse_huge_page_size("Hugepagesize: x kB\n"), None);
        assert_eq!(parse_huge_page_size("Hugepagesize: 3 kB\n"), None);
        assert_eq!(parse_huge_page_size("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn rounds_up() {
        assert_eq!(round_up(0, 4096), Some(0));
        assert_eq!(round_up(1, 4096), Some(4096));
        assert_eq!(round_up(4096, 4096), Some(4096));
        assert_eq!(round_up(usize::MAX, 4096), None);
    }

    #[test]
    fn aligned_mappings_are_aligned_and_trimmed() {
        for align in [0usize, 4096, 1 << 16, 1 << 21, 1 << 26] {
            let m = map_anonymous(10_000, align, AnonPages::Normal).expect("map");
            assert_eq!(m.addr() % align.max(page_size()), 0, "align {align}");
            assert_eq!(m.len(), round_up(10_000, page_size()).expect("fits"));
        }
    }

    #[test]
    fn unmapped_and_untouched_pages_have_no_node() {
        let m = map_anonymous(4096, 0, AnonPages::Normal).expect("map");
        // Not faulted in yet: move_pages reports -ENOENT, and must not fault it in.
        assert_eq!(page_node(m.addr() as u64), None);
        assert_eq!(page_node(m.addr() as u64), None);
    }

    #[test]
    fn touched_pages_report_their_node() {
        let m = map_anonymous(4096, 0, AnonPages::Normal).expect("map");
        // SAFETY: `m` is a live, writable 4096-byte mapping owned by this test.
        unsafe { (m.addr() as *mut u8).write_volatile(1) };
        let node = page_node(m.addr() as u64 + 100);
        // A kernel without NUMA support answers ENOSYS (None); otherwise the page has a node.
        if std::path::Path::new("/sys/devices/system/node/node0").exists() {
            assert!(node.is_some(), "faulted-in page has no node");
        }
    }
}
