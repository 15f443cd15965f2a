//! Thin wrappers over the Linux system calls this crate needs. Every `unsafe` block of the crate
//! that calls into libc lives here; the rest of the crate sees safe functions and owned types.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use mooncake_core::Opcode;

/// Largest number of iovecs one `process_vm_*` call accepts (`UIO_MAXIOV`).
pub(crate) const IOV_MAX: usize = 1024;

/// One contiguous range for `process_vm_*`: an address and a length in some process.
pub(crate) type IoVec = libc::iovec;

/// An iovec for `[addr, addr+len)`.
pub(crate) fn iovec(addr: u64, len: u64) -> IoVec {
    IoVec { iov_base: addr as usize as *mut libc::c_void, iov_len: len as usize }
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

/// `process_vm_readv` (read: remote -> local) or `process_vm_writev` (write: local -> remote) of
/// process `pid`. Returns the bytes moved, which may be fewer than asked (partial transfer at
/// iovec granularity); retries on `EINTR`.
///
/// The kernel validates every address of both sides: a range that is not mapped fails with
/// `EFAULT` or shortens the transfer; memory is never touched outside the given ranges.
pub(crate) fn process_vm(pid: i32, op: Opcode, local: &[IoVec], remote: &[IoVec]) -> io::Result<usize> {
    if local.len() > IOV_MAX || remote.len() > IOV_MAX {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    loop {
        let n = match op {
            // SAFETY: the iovec arrays are valid for the given counts for the duration of the
            // call; the kernel checks that the ranges they describe are mapped in each process and
            // writes only into the local ranges, which the caller owns for this call (a registered
            // region held by a guard, or a buffer the engine's caller vouched for).
            Opcode::Read => unsafe {
                libc::process_vm_readv(
                    pid,
                    local.as_ptr(),
                    local.len() as libc::c_ulong,
                    remote.as_ptr(),
                    remote.len() as libc::c_ulong,
                    0,
                )
            },
            // SAFETY: as above; a write only reads the local ranges and writes the remote ones,
            // which the initiator validated against the target's live registration table.
            Opcode::Write => unsafe {
                libc::process_vm_writev(
                    pid,
                    local.as_ptr(),
                    local.len() as libc::c_ulong,
                    remote.as_ptr(),
                    remote.len() as libc::c_ulong,
                    0,
                )
            },
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Lets any process of the same user attach (`prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY)`), which
/// Yama `ptrace_scope=1` requires for `process_vm_*` from a non-ancestor. `EINVAL` means Yama is
/// not active: nothing to do.
pub(crate) fn allow_any_tracer() -> io::Result<()> {
    // SAFETY: prctl with integer arguments; PR_SET_PTRACER reads no memory.
    let r = unsafe { libc::prctl(libc::PR_SET_PTRACER, libc::PR_SET_PTRACER_ANY, 0, 0, 0) };
    match cvt(r) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Yama's `ptrace_scope` (None when Yama is not active).
pub(crate) fn ptrace_scope() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok().and_then(|s| s.trim().parse().ok())
}

/// A sealable anonymous file (`memfd_create(MFD_CLOEXEC | MFD_ALLOW_SEALING)`) of `len` bytes,
/// sealed against shrinking and growing so no process mapping it can be hit by `SIGBUS`.
pub(crate) fn sealed_memfd(name: &str, len: u64) -> io::Result<OwnedFd> {
    let cname = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
    let fd = cvt(unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) })?;
    // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscalls on a descriptor we own.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) })?;
    // SAFETY: as above.
    cvt(unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL)
    })?;
    Ok(fd)
}

/// The seals of a memfd (`F_GET_SEALS`).
pub(crate) fn seals(fd: &OwnedFd) -> io::Result<libc::c_int> {
    // SAFETY: fcntl on a descriptor we own; F_GET_SEALS takes no pointer.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })
}

/// True when `fd` carries the seals that make a shared mapping of it safe from `SIGBUS`.
pub(crate) fn is_size_sealed(seals: libc::c_int) -> bool {
    seals & libc::F_SEAL_SHRINK != 0
}

/// Size of the file behind `fd`.
pub(crate) fn file_size(fd: &OwnedFd) -> io::Result<u64> {
    let file = std::fs::File::from(fd.try_clone()?);
    Ok(file.metadata()?.len())
}

/// A shared read-write mapping of the first `len` bytes of a file; unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory that this crate only accesses through atomics; the
// pointer stays valid until drop, whichever thread holds the value.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` hands out only atomic views of the memory.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` shared, readable and writable.
    pub(crate) fn shared(fd: &OwnedFd, len: usize) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a fresh mapping chosen by the kernel (no fixed address), of a file we hold open.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(Mapping { ptr, len })
    }

    /// Start of the mapping (page aligned).
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range mmap returned; no reference into it outlives `self`
        // (views borrow the mapping).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// `pidfd_open(pid)`: a descriptor that becomes readable when the process exits. `None` on
/// kernels without it (before 5.3).
pub(crate) fn pidfd_open(pid: i32) -> io::Result<Option<OwnedFd>> {
    // SAFETY: a syscall with integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOSYS) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: the kernel returned a fresh descriptor that nothing else owns.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(r as libc::c_int) }))
}

/// True when the process behind `pidfd` has exited (the descriptor polls readable).
pub(crate) fn pidfd_exited(pidfd: &OwnedFd) -> bool {
    let mut p = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    loop {
        // SAFETY: one valid pollfd for the duration of the call; zero timeout.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        if r >= 0 {
            return r > 0 && p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return false;
        }
    }
}

/// Opens `/proc/<pid>` as a directory: files opened relative to it belong to that very process
/// even if it exits and its pid is reused meanwhile (they fail with `ESRCH` instead).
pub(crate) fn open_proc_dir(pid: i32) -> io::Result<OwnedFd> {
    open_path(&format!("/proc/{pid}"), libc::O_RDONLY | libc::O_DIRECTORY)
}

fn open_path(path: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let fd = cvt(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens `path` relative to the directory `dir`.
pub(crate) fn open_at(dir: &OwnedFd, path: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a valid NUL-terminated path; `dir` is an open directory descriptor.
    let fd = cvt(unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads a small file relative to `dir` (e.g. `stat` of a `/proc/<pid>` directory).
pub(crate) fn read_at(dir: &OwnedFd, path: &str) -> io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::from(open_at(dir, path, libc::O_RDONLY)?);
    let mut s = String::new();
    f.read_to_string(&mut s)?;
    Ok(s)
}

/// 128 random bits from the kernel (`getrandom`), or from the clock and pid where it fails.
pub(crate) fn random_token() -> [u64; 2] {
    let mut buf = [0u8; 16];
    // SAFETY: writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == buf.len() as isize {
        let (a, b) = buf.split_at(8);
        let hi = u64::from_ne_bytes(a.try_into().unwrap_or_default());
        let lo = u64::from_ne_bytes(b.try_into().unwrap_or_default());
        return [hi, lo];
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    [now.as_nanos() as u64, (u64::from(std::process::id()) << 32) ^ now.subsec_nanos() as u64 ^ 0x9E37_79B9_7F4A_7C15]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_vm_on_self_moves_bytes_both_ways() {
        let src: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let mut dst = vec![0u8; 4096];
        let pid = std::process::id() as i32;
        let local = [iovec(dst.as_mut_ptr() as u64, 4096)];
        let remote = [iovec(src.as_ptr() as u64, 4096)];
        assert_eq!(process_vm(pid, Opcode::Read, &local, &remote).unwrap(), 4096);
        assert_eq!(dst, src);
        let mut back = vec![0u8; 100];
        let local = [iovec(src.as_ptr() as u64 + 10, 100)];
        let remote = [iovec(back.as_mut_ptr() as u64, 100)];
        assert_eq!(process_vm(pid, Opcode::Write, &local, &remote).unwrap(), 100);
        assert_eq!(back, src[10..110]);
    }

    #[test]
    fn process_vm_reports_unmapped_and_dead_targets() {
        let mut dst = vec![0u8; 64];
        let local = [iovec(dst.as_mut_ptr() as u64, 64)];
        let pid = std::process::id() as i32;
        let e = process_vm(pid, Opcode::Read, &local, &[iovec(0x10, 64)]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EFAULT));
        // A reaped child: its pid names no process (unless reused at once, which the kernel avoids).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id() as i32;
        child.wait().unwrap();
        let e = process_vm(dead, Opcode::Read, &local, &[iovec(dst.as_ptr() as u64, 64)]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ESRCH));
        let too_many = vec![iovec(dst.as_mut_ptr() as u64, 0); IOV_MAX + 1];
        assert!(process_vm(pid, Opcode::Read, &too_many, &local).is_err());
    }

    #[test]
    fn sealed_memfd_maps_shared_and_refuses_resizing() {
        let fd = sealed_memfd("mooncake-shm-test", 8192).unwrap();
        assert_eq!(file_size(&fd).unwrap(), 8192);
        assert!(is_size_sealed(seals(&fd).unwrap()));
        // SAFETY: plain syscall on our descriptor; it must fail because of the seal.
        assert!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) } < 0);
        let a = Mapping::shared(&fd, 8192).unwrap();
        let b = Mapping::shared(&fd, 8192).unwrap();
        // SAFETY: both mappings are 8192 bytes long and alive; byte 100 is in range.
        unsafe {
            *a.as_ptr().add(100) = 42;
            assert_eq!(*b.as_ptr().add(100), 42);
        }
        assert_eq!(a.len(), 8192);
    }

    #[test]
    fn pidfd_sees_exit() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let fd = pidfd_open(child.id() as i32).unwrap().expect("pidfd_open exists on this kernel");
        assert!(!pidfd_exited(&fd));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(pidfd_exited(&fd));
    }

    #[test]
    fn tokens_differ() {
        assert_ne!(random_token(), random_token());
        allow_any_tracer().unwrap();
    }
}
