//! `mooncake.store.bind_to_numa_node`: pins the calling thread to a NUMA node's CPUs and prefers that node's
//! memory for its later allocations, as upstream's (which uses libnuma). A node that does not exist, or a
//! kernel without NUMA support, changes nothing and logs why; like upstream's, the call returns None.

use pyo3::prelude::*;

/// Sysfs directory of NUMA node `n`.
fn node_dir(n: u32) -> String {
    format!("/sys/devices/system/node/node{n}")
}

/// CPUs in a sysfs list such as `0-3,8,10-11`; `None` when it does not parse.
fn parse_cpu_list(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                if a > b {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

/// Binds the calling thread to NUMA node `node`'s CPUs and prefers its memory (see the module docs).
#[pyfunction]
pub fn bind_to_numa_node(node: i64) {
    let Ok(node) = u32::try_from(node) else {
        tracing::warn!("bind_to_numa_node({node}): not a NUMA node id; nothing changed");
        return;
    };
    let Some(cpus) =
        std::fs::read_to_string(format!("{}/cpulist", node_dir(node))).ok().and_then(|t| parse_cpu_list(&t))
    else {
        tracing::warn!("bind_to_numa_node({node}): no such NUMA node on this machine; nothing changed");
        return;
    };
    if cpus.is_empty() {
        tracing::warn!("bind_to_numa_node({node}): the node has no CPUs (memory only); threads stay where they are");
    } else {
        // SAFETY: `cpu_set_t` is a plain bit array; zeroed is its empty value, and CPU_SET writes bits inside it
        // (indices past CPU_SETSIZE are skipped below).
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &cpu in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            // SAFETY: `cpu` < CPU_SETSIZE, so the bit lies inside `set`.
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
        // SAFETY: pid 0 is the calling thread; `set` is a valid, initialized cpu_set_t of the size passed.
        let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        if rc != 0 {
            tracing::warn!("bind_to_numa_node({node}): sched_setaffinity: {}", std::io::Error::last_os_error());
        }
    }
    // Prefer the node's memory (MPOL_PREFERRED with a one-node mask).
    const MPOL_PREFERRED: libc::c_long = 1;
    let mut mask = [0 as libc::c_ulong; 16];
    let bits = libc::c_ulong::BITS as usize;
    let Some(word) = mask.get_mut(node as usize / bits) else {
        tracing::warn!("bind_to_numa_node({node}): node id beyond the supported mask; memory policy unchanged");
        return;
    };
    *word |= 1 << (node as usize % bits);
    let maxnode = (mask.len() * bits) as libc::c_ulong;
    // SAFETY: set_mempolicy reads `maxnode` bits from `mask`, which holds exactly that many; it only changes the
    // calling thread's allocation policy.
    let rc = unsafe { libc::syscall(libc::SYS_set_mempolicy, MPOL_PREFERRED, mask.as_ptr(), maxnode) };
    if rc != 0 {
        tracing::warn!("bind_to_numa_node({node}): set_mempolicy: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::parse_cpu_list;

    #[test]
    fn cpu_lists_parse_as_sysfs_writes_them() {
        assert_eq!(parse_cpu_list("0-3,8,10-11\n"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(parse_cpu_list(""), Some(vec![]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }
}
