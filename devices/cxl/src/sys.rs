//! Thin wrappers over the Linux calls this crate needs: a shared mapping of the device at an aligned address, the
//! open-file-description lock, process identity and liveness, random bytes.
//!
//! Every raw call of the crate except the cache-line instructions ([`crate::flush`]) and the header's atomics
//! ([`crate::layout`]) lives here, behind safe functions whose arguments cannot break memory safety.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

/// A shared mapping of a file, owned by this value: unmapped on drop. The address is a number so the type is
/// `Send + Sync`; whoever dereferences it keeps the mapping alive meanwhile.
#[derive(Debug)]
pub(crate) struct SharedMapping {
    addr: usize,
    len: usize,
}

impl SharedMapping {
    pub(crate) fn addr(&self) -> usize {
        self.addr
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: [addr, addr+len) is the mapping this value created and owns; nothing refers to it any more
        // (every user holds the SharedMapping's owner alive while it reads or writes).
        let rc = unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        if rc != 0 {
            tracing::warn!(addr = self.addr, len = self.len, error = %io::Error::last_os_error(), "munmap failed");
        }
    }
}

/// Maps `len` bytes of `fd` from offset 0, shared and read-write, at an address that is a multiple of `align`
/// (a power of two, at least the page size): reserves `len + align` bytes of address space, then maps the file
/// over the aligned part with `MAP_FIXED` and gives back the rest.
pub(crate) fn map_shared_aligned(fd: BorrowedFd<'_>, len: usize, align: usize) -> io::Result<SharedMapping> {
    let too_big = || io::Error::new(io::ErrorKind::InvalidInput, "length plus alignment overflows the address space");
    let over = len.checked_add(align).ok_or_else(too_big)?;
    // SAFETY: a fresh anonymous PROT_NONE reservation at an address the kernel picks; it overlaps nothing.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            over,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = base as usize;
    let start = base.next_multiple_of(align);
    // SAFETY: [start, start+len) lies inside the reservation made above, which nothing else uses; MAP_FIXED
    // replaces that part of it with the file mapping.
    let got = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd.as_raw_fd(),
            0,
        )
    };
    if got == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        // SAFETY: the whole reservation is ours and unused.
        unsafe { libc::munmap(base as *mut libc::c_void, over) };
        return Err(e);
    }
    let head = start - base;
    let tail = over - head - len;
    if head > 0 {
        // SAFETY: the unaligned head of our own reservation, never handed out.
        unsafe { libc::munmap(base as *mut libc::c_void, head) };
    }
    if tail > 0 {
        // SAFETY: the tail of our own reservation past the file mapping, never handed out.
        unsafe { libc::munmap((start + len) as *mut libc::c_void, tail) };
    }
    Ok(SharedMapping { addr: start, len })
}

/// Faults in `[addr, addr+len)` of a shared mapping for writing (`MADV_POPULATE_WRITE`); a hint.
pub(crate) fn populate_write(addr: usize, len: usize) -> io::Result<()> {
    const MADV_POPULATE_WRITE: libc::c_int = 23;
    let page = page_size();
    let start = addr & !(page - 1);
    let len = (addr + len - start).next_multiple_of(page);
    // SAFETY: madvise with POPULATE_WRITE only faults pages in; the caller passes a range of a live mapping.
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, MADV_POPULATE_WRITE) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// The base page size.
pub(crate) fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf only reads a configuration value.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if v > 0 && (v as usize).is_power_of_two() { v as usize } else { 4096 }
    })
}

/// Takes (`lock = true`, waiting) or releases the write lock of byte 0 of `fd`'s file as an open file description
/// lock (`F_OFD_SETLKW`): held per open file, released by the kernel when the process dies.
pub(crate) fn ofd_lock(fd: BorrowedFd<'_>, lock: bool) -> io::Result<()> {
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if lock { libc::F_WRLCK } else { libc::F_UNLCK } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 1;
    loop {
        // SAFETY: fcntl with F_OFD_SETLKW reads the flock we pass, which lives across the call.
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLKW, &mut fl) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Who this process is, in terms another process mapping the region can check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// Hash of the kernel boot id and the pid namespace: equal means pids name the same processes.
    pub host: u64,
    /// Process id.
    pub pid: u32,
    /// Process start time (`/proc/<pid>/stat` field 22, clock ticks since boot): tells a reused pid apart.
    pub start: u64,
}

impl Identity {
    /// This process (computed once).
    pub fn current() -> Identity {
        static ME: OnceLock<Identity> = OnceLock::new();
        *ME.get_or_init(|| {
            let pid = std::process::id();
            Identity { host: host_tag(), pid, start: start_time(pid).unwrap_or(0) }
        })
    }

    /// Whether the process `pid` with start time `start` of this host still runs (a pid now used by another
    /// process counts as gone). Meaningful only for identities with our [`Identity::host`].
    pub fn alive(pid: u32, start: u64) -> bool {
        start_time(pid).is_some_and(|s| s == start)
    }
}

/// FNV-1a over the boot id and the pid namespace inode.
fn host_tag() -> u64 {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let ns = std::fs::read_link("/proc/self/ns/pid").map(|p| p.display().to_string()).unwrap_or_default();
    let tag = fnv1a(format!("{}|{ns}", boot.trim()).as_bytes());
    // 0 means "no owner" in the tables.
    tag.max(1)
}

/// FNV-1a 64.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Field 22 of `/proc/<pid>/stat`.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A pidfd of a process of this host: tells without a race with pid reuse whether it has exited.
#[derive(Debug)]
pub struct PidWatch {
    fd: OwnedFd,
}

impl PidWatch {
    /// Watches process `pid` if it is the one that started at `start`; `None` when it is gone already.
    pub fn open(pid: u32, start: u64) -> Option<PidWatch> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0 as libc::c_long) };
        if fd < 0 {
            return None;
        }
        // SAFETY: the syscall returned a fresh descriptor that we own from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        // Checked after opening: a pid reused between reading the table and opening the pidfd is caught here.
        Identity::alive(pid, start).then_some(PidWatch { fd })
    }

    /// True once the process has exited.
    pub fn exited(&self) -> bool {
        let mut p = libc::pollfd { fd: self.fd.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll reads and writes the one pollfd we pass, with a zero timeout.
        let rc = unsafe { libc::poll(&mut p, 1, 0) };
        rc > 0 && p.revents != 0
    }
}

/// 16 random bytes (the region id).
pub(crate) fn random_u128() -> u128 {
    let mut buf = [0u8; 16];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        // No entropy call (very old kernel): time and pid are enough to tell regions apart.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        return t ^ (u128::from(std::process::id()) << 64);
    }
    u128::from_le_bytes(buf)
}

/// Device and inode of an open file.
pub(crate) fn file_id(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    // SAFETY: an all-zero stat is a valid value of this plain C struct; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the stat we pass.
    let rc = unsafe { libc::fstat(fd.as_raw_fd(), &mut st) };
    if rc == 0 { Ok((st.st_dev, st.st_ino)) } else { Err(io::Error::last_os_error()) }
}
