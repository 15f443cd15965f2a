//! What the GPU IPC transports ask the kernel: the boot id (which host a handle belongs to) and a copy of
//! another process's file descriptor (`pidfd_open` + `pidfd_getfd`, for shareable-fd handles).

use std::os::fd::{FromRawFd, OwnedFd};

use mooncake_core::{Error, Result};

/// This kernel's boot id (`/proc/sys/kernel/random/boot_id`): equal on both sides only within one host.
pub fn boot_id() -> Result<String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map_err(|e| Error::unavailable(format!("cannot read /proc/sys/kernel/random/boot_id: {e}")))?;
    let id = raw.trim();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(Error::unavailable(format!("unexpected boot id {id:?}")));
    }
    Ok(id.to_string())
}

/// A duplicate, in this process, of descriptor `fd` of process `pid`. Needs ptrace access to `pid` (same user,
/// and Yama `ptrace_scope` allowing it) and the same pid namespace; the errors say which step failed.
pub fn fetch_fd(pid: i32, fd: i32) -> Result<OwnedFd> {
    if pid <= 0 || fd < 0 {
        return Err(Error::InvalidArgument(format!("shareable-fd handle names pid {pid}, fd {fd}")));
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory is passed.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::RemoteDisconnected {
            peer: format!("pid {pid}"),
            reason: format!("pidfd_open: {e} (the exporting process has exited, or lives in another pid namespace)"),
        });
    }
    // SAFETY: `pidfd` is a descriptor pidfd_open just returned to us; we own it from here on.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_getfd takes our pidfd, the target's descriptor number and flags; no memory is passed.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if copy < 0 {
        let e = std::io::Error::last_os_error();
        return Err(Error::unavailable(format!(
            "pidfd_getfd of fd {fd} in pid {pid}: {e} (needs ptrace access to the exporter: same user and a Yama \
             ptrace_scope that allows it, or CAP_SYS_PTRACE)"
        )));
    }
    // SAFETY: `copy` is a new descriptor pidfd_getfd installed in this process; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(copy as i32) })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn boot_id_is_stable() {
        assert_eq!(boot_id().unwrap(), boot_id().unwrap());
    }

    #[test]
    fn fetches_a_descriptor_of_a_process() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"handle").unwrap();
        let copy = fetch_fd(std::process::id() as i32, f.as_raw_fd()).unwrap();
        let mut g = std::fs::File::from(copy);
        g.rewind().unwrap();
        let mut s = String::new();
        g.read_to_string(&mut s).unwrap();
        assert_eq!(s, "handle");
    }

    #[test]
    fn bad_pids_and_fds_are_typed_errors() {
        assert!(matches!(fetch_fd(0, 3), Err(Error::InvalidArgument(_))));
        assert!(matches!(fetch_fd(i32::MAX, 3), Err(Error::RemoteDisconnected { .. })));
        let e = fetch_fd(std::process::id() as i32, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("pidfd_getfd"), "{e}");
    }
}
