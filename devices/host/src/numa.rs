//! NUMA topology from sysfs (`/sys/devices/system/node`): online nodes and the CPUs of each.
//!
//! Machines or containers without that directory are reported as a single node 0 holding every
//! online CPU, which is what upstream Mooncake assumes too.
//!
//! ```
//! use mooncake_device_host::numa;
//! assert_eq!(numa::parse_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
//! let topo = numa::Topology::detect();
//! assert!(topo.node_count() >= 1);
//! ```

use std::path::Path;

use mooncake_core::{Error, Result};

/// Where Linux describes NUMA nodes.
pub const SYSFS_NODE_ROOT: &str = "/sys/devices/system/node";

/// Where Linux lists online CPUs (used when there is no node directory).
pub const SYSFS_CPU_ONLINE: &str = "/sys/devices/system/cpu/online";

/// Parses a kernel list such as `0-1,3` or `0-3,8-11` into sorted, distinct numbers.
///
/// Whitespace around the list and its items is ignored; an empty list is empty.
pub fn parse_list(s: &str) -> Result<Vec<u32>> {
    let bad = |why: String| Error::InvalidArgument(format!("malformed kernel list {s:?}: {why}"));
    let mut out = Vec::new();
    for item in s.trim().split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let num = |t: &str| t.trim().parse::<u32>().map_err(|_| bad(format!("{t:?} is not a number")));
        match item.split_once('-') {
            None => out.push(num(item)?),
            Some((lo, hi)) => {
                let (lo, hi) = (num(lo)?, num(hi)?);
                if lo > hi {
                    return Err(bad(format!("range {item:?} is reversed")));
                }
                if hi - lo > 1 << 20 {
                    return Err(bad(format!("range {item:?} is implausibly large")));
                }
                out.extend(lo..=hi);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaNode {
    /// Node number (the `N` of `cpu:N`).
    pub id: u32,
    /// CPUs of the node, sorted.
    pub cpus: Vec<u32>,
}

/// The online NUMA nodes of this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Online nodes, sorted by id; never empty.
    pub nodes: Vec<NumaNode>,
}

impl Topology {
    /// Reads the topology of this machine, falling back to one node 0 holding every online CPU.
    pub fn detect() -> Topology {
        match Topology::from_sysfs(Path::new(SYSFS_NODE_ROOT)) {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(error = %e, "no NUMA topology in sysfs; assuming one node");
                Topology::single_node(all_online_cpus())
            }
        }
    }

    /// A machine with one node 0 and the given CPUs.
    pub fn single_node(cpus: Vec<u32>) -> Topology {
        Topology { nodes: vec![NumaNode { id: 0, cpus }] }
    }

    /// Reads `<root>/online` and `<root>/node<N>/cpulist` (root is normally [`SYSFS_NODE_ROOT`]).
    ///
    /// A node whose `cpulist` is missing is kept with no CPUs (memory-only nodes, e.g. CXL).
    pub fn from_sysfs(root: &Path) -> Result<Topology> {
        let online = std::fs::read_to_string(root.join("online"))?;
        Topology::from_lists(&online, |id| std::fs::read_to_string(root.join(format!("node{id}/cpulist"))).ok())
    }

    /// Builds a topology from the text of the `online` file and a lookup of each node's `cpulist`.
    pub fn from_lists(online: &str, mut cpulist: impl FnMut(u32) -> Option<String>) -> Result<Topology> {
        let ids = parse_list(online)?;
        if ids.is_empty() {
            return Err(Error::InvalidArgument("no NUMA node is online".into()));
        }
        let mut nodes = Vec::with_capacity(ids.len());
        for id in ids {
            let cpus = match cpulist(id) {
                Some(s) => parse_list(&s)?,
                None => Vec::new(),
            };
            nodes.push(NumaNode { id, cpus });
        }
        Ok(Topology { nodes })
    }

    /// Number of online nodes (at least 1).
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Ids of the online nodes.
    pub fn node_ids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// The node with this id, if online.
    pub fn node(&self, id: u32) -> Option<&NumaNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// True when node `id` is online.
    pub fn has_node(&self, id: u32) -> bool {
        self.node(id).is_some()
    }

    /// The node a CPU belongs to.
    pub fn node_of_cpu(&self, cpu: u32) -> Option<u32> {
        self.nodes.iter().find(|n| n.cpus.binary_search(&cpu).is_ok()).map(|n| n.id)
    }
}

/// Ids of the online NUMA nodes of this machine (`[0]` without NUMA support).
pub fn online_nodes() -> Vec<u32> {
    Topology::detect().node_ids()
}

/// Number of online NUMA nodes of this machine (at least 1).
pub fn node_count() -> usize {
    Topology::detect().node_count()
}

fn all_online_cpus() -> Vec<u32> {
    if let Some(cpus) = std::fs::read_to_string(SYSFS_CPU_ONLINE).ok().and_then(|s| parse_list(&s).ok()) {
        return cpus;
    }
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    (0..n as u32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_lists() {
        assert_eq!(parse_list("0").unwrap(), vec![0]);
        assert_eq!(parse_list("0-1,3\n").unwrap(), vec![0, 1, 3]);
        assert_eq!(parse_list("0-3,8-11").unwrap(), vec![0, 1, 2, 3, 8, 9, 10, 11]);
        assert_eq!(parse_list(" 4 , 2-3 ,2 ").unwrap(), vec![2, 3, 4]);
        assert_eq!(parse_list("").unwrap(), Vec::<u32>::new());
        assert_eq!(parse_list("\n").unwrap(), Vec::<u32>::new());
        assert_eq!(parse_list("5-5").unwrap(), vec![5]);
    }

    #[test]
    fn rejects_malformed_lists() {
        for bad in ["a", "1-", "-1", "3-1", "0-1,x", "1-2-3", "0-4294967295"] {
            assert!(matches!(parse_list(bad), Err(Error::InvalidArgument(_))), "{bad:?} accepted");
        }
    }

    #[test]
    fn builds_topology_from_fixture_strings() {
        let cpulists = |id: u32| match id {
            0 => Some("0-3,8-11\n".to_string()),
            1 => Some("4-7,12-15\n".to_string()),
            _ => None,
        };
        let t = Topology::from_lists("0-1,3\n", cpulists).unwrap();
        assert_eq!(t.node_count(), 3);
        assert_eq!(t.node_ids(), vec![0, 1, 3]);
        assert_eq!(t.node(1).unwrap().cpus, vec![4, 5, 6, 7, 12, 13, 14, 15]);
        assert!(t.node(3).unwrap().cpus.is_empty(), "memory-only node");
        assert!(t.has_node(3) && !t.has_node(2));
        assert_eq!(t.node_of_cpu(9), Some(0));
        assert_eq!(t.node_of_cpu(13), Some(1));
        assert_eq!(t.node_of_cpu(99), None);
    }

    #[test]
    fn empty_or_malformed_online_is_an_error() {
        assert!(Topology::from_lists("", |_| None).is_err());
        assert!(Topology::from_lists("0-x", |_| None).is_err());
        assert!(Topology::from_lists("0", |_| Some("garbage".into())).is_err());
    }

    #[test]
    fn reads_a_sysfs_tree() {
        let root = std::env::temp_dir().join(format!("mooncake-numa-test-{}", std::process::id()));
        std::fs::create_dir_all(root.join("node0")).unwrap();
        std::fs::create_dir_all(root.join("node2")).unwrap();
        std::fs::write(root.join("online"), "0,2\n").unwrap();
        std::fs::write(root.join("node0/cpulist"), "0-1\n").unwrap();
        std::fs::write(root.join("node2/cpulist"), "2-3\n").unwrap();
        let t = Topology::from_sysfs(&root);
        let _ = std::fs::remove_dir_all(&root);
        let t = t.unwrap();
        assert_eq!(t.node_ids(), vec![0, 2]);
        assert_eq!(t.node(2).unwrap().cpus, vec![2, 3]);
        assert!(Topology::from_sysfs(Path::new("/nonexistent/mooncake")).is_err());
    }

    #[test]
    fn detect_never_fails() {
        let t = Topology::detect();
        assert!(t.node_count() >= 1);
        assert_eq!(online_nodes(), t.node_ids());
        assert_eq!(node_count(), t.node_count());
    }
}
