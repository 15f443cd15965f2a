//! Whether a range of this process's address space is mapped, so that an address a Python caller passes
//! as an int (upstream's convention) is refused with an error code instead of crashing the interpreter
//! when it points nowhere.

/// Largest range accepted: the x86-64 / AArch64 user address space with 5-level page tables.
const MAX_USER_ADDRESS: u64 = 1 << 57;

/// Pages checked per `mincore` call (1 GiB of 4 KiB pages).
const PAGES_PER_CALL: usize = 1 << 18;

/// Ok when every page of `[addr, addr+len)` is mapped in this process; else a message saying why not.
/// Zero-length ranges are accepted. It cannot see page protections: a mapped read-only page passes.
pub fn check_mapped(addr: u64, len: u64) -> Result<(), String> {
    if len == 0 {
        return Ok(());
    }
    let end = addr
        .checked_add(len)
        .filter(|e| *e <= MAX_USER_ADDRESS)
        .ok_or_else(|| format!("[{addr:#x}, +{len}) is outside the user address space"))?;
    if addr == 0 {
        return Err("address 0 (null)".into());
    }
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let mut at = addr & !(page - 1);
    let mut residency = vec![0u8; PAGES_PER_CALL];
    while at < end {
        let pages = ((end - at).div_ceil(page) as usize).min(PAGES_PER_CALL);
        // SAFETY: mincore only reads the process's page tables for the page-aligned range
        // `[at, at + pages*page)` and writes one byte per page into `residency`, which has `pages` bytes.
        let rc = unsafe { libc::mincore(at as *mut libc::c_void, pages * page as usize, residency.as_mut_ptr()) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            return Err(format!("[{addr:#x}, +{len}) is not mapped memory of this process ({err})"));
        }
        at += pages as u64 * page;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_memory_is_mapped() {
        let v = vec![1u8; 3 * 4096 + 17];
        assert!(check_mapped(v.as_ptr() as u64, v.len() as u64).is_ok());
        assert!(check_mapped(v.as_ptr() as u64, 0).is_ok());
    }

    #[test]
    fn null_low_and_impossible_ranges_are_refused() {
        assert!(check_mapped(0, 16).is_err());
        assert!(check_mapped(0x3039, 16).is_err());
        assert!(check_mapped(4096, 1 << 62).is_err());
        assert!(check_mapped(u64::MAX - 4, 16).is_err());
    }
}
