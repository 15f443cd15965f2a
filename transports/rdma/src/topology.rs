//! Topology discovery from sysfs and upstream's NIC priority matrix.
//!
//! Reads, under a sysfs root (normally `/sys`, a fixture tree in tests):
//! - NICs: `class/infiniband/<nic>/device` (a link to the PCI device), its `numa_node`;
//! - GPUs: `bus/pci/devices/*` with class `0x0300xx`/`0x0302xx` and vendor `0x10de` (`cuda:N`) or
//!   `0x1002` (`hip:N`), numbered per vendor in PCI address order;
//! - CPUs: `devices/system/node/node<N>/cpulist`.
//!
//! The matrix maps a memory location to `[[preferred NICs], [fallback NICs]]`:
//! - `cpu:N`: NICs on NUMA node N are preferred (a NIC with unknown node counts as node 0's when the
//!   machine has a single node), the rest are fallbacks;
//! - a GPU: the NICs behind the same PCIe switch (their paths share a bridge below the root
//!   complex) at the fewest hops are preferred; when none shares a switch, the NICs on the GPU's
//!   NUMA node; the rest are fallbacks.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mooncake_core::{Error, Location, Result};
use serde_json::{Map, Value};

/// A PCI function as seen in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDevice {
    /// Bus address (`0000:04:00.0`).
    pub addr: String,
    /// Path components below `devices/`, root complex first
    /// (`["pci0000:00", "0000:00:01.0", ..., "0000:04:00.0"]`); empty when unknown.
    pub path: Vec<String>,
    /// NUMA node, when the platform reports one.
    pub numa_node: Option<u32>,
}

/// An RDMA NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// Device name (`mlx5_0`).
    pub name: String,
    /// Its PCI function (`None` for software devices such as rxe).
    pub pci: Option<PciDevice>,
}

/// A GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// Location name (`cuda:0`, `hip:1`).
    pub location: String,
    /// Its PCI function.
    pub pci: PciDevice,
}

/// What sysfs says about NICs, GPUs and NUMA nodes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Topology {
    /// NICs, by name.
    pub nics: Vec<Nic>,
    /// GPUs, NVIDIA first, each vendor in PCI address order.
    pub gpus: Vec<Gpu>,
    /// NUMA node -> its CPUs (node 0 with no CPUs listed when sysfs has no node directory).
    pub numa_nodes: BTreeMap<u32, Vec<u32>>,
}

/// PCIe relation of two devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciRelation {
    /// Leading path components the two share (0 = different root complexes, 1 = same root
    /// complex only, 2 or more = same root port / PCIe switch).
    pub shared_depth: usize,
    /// Links from each device up to the deepest common ancestor, summed.
    pub hops: usize,
}

/// Relation of two PCI paths (see [`PciDevice::path`]).
pub fn pci_relation(a: &[String], b: &[String]) -> PciRelation {
    let shared_depth = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    PciRelation { shared_depth, hops: (a.len() - shared_depth) + (b.len() - shared_depth) }
}

/// Parses a sysfs cpulist (`0-3,8,10-11`).
pub fn parse_cpulist(s: &str) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || Error::InvalidArgument(format!("cpulist {s:?}: bad element {part:?}"));
        match part.split_once('-') {
            Some((lo, hi)) => {
                let lo: u32 = lo.trim().parse().map_err(|_| bad())?;
                let hi: u32 = hi.trim().parse().map_err(|_| bad())?;
                if hi < lo || hi - lo > 1 << 16 {
                    return Err(bad());
                }
                out.extend(lo..=hi);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    Ok(out)
}

fn read_trim(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn read_hex(path: &Path) -> Option<u32> {
    let s = read_trim(path)?;
    u32::from_str_radix(s.trim_start_matches("0x").trim_start_matches("0X"), 16).ok()
}

fn sorted_entries(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut v: Vec<(String, PathBuf)> = match fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| (e.file_name().to_string_lossy().into_owned(), e.path())).collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Resolves a link to a PCI device directory into a [`PciDevice`].
fn pci_device(link: &Path, devices_root: Option<&Path>) -> Option<PciDevice> {
    let real = fs::canonicalize(link).ok()?;
    let addr = real.file_name()?.to_string_lossy().into_owned();
    let below = devices_root.and_then(|r| real.strip_prefix(r).ok()).unwrap_or(&real);
    let path = below.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).filter(|c| c != "/").collect();
    let numa_node =
        read_trim(&real.join("numa_node")).and_then(|s| s.parse::<i64>().ok()).and_then(|n| u32::try_from(n).ok());
    Some(PciDevice { addr, path, numa_node })
}

impl Topology {
    /// Reads the topology under `sysfs_root`, keeping only the NICs in `nic_filter` (empty = all).
    /// Missing directories mean "none of those"; this never fails on a machine without NICs or GPUs.
    pub fn discover(sysfs_root: &Path, nic_filter: &[String]) -> Topology {
        let devices_root = fs::canonicalize(sysfs_root.join("devices")).ok();
        let devices_root = devices_root.as_deref();

        let nics = sorted_entries(&sysfs_root.join("class/infiniband"))
            .into_iter()
            .filter(|(name, _)| nic_filter.is_empty() || nic_filter.contains(name))
            .map(|(name, dir)| Nic { pci: pci_device(&dir.join("device"), devices_root), name })
            .collect();

        let mut cuda = Vec::new();
        let mut hip = Vec::new();
        for (_, link) in sorted_entries(&sysfs_root.join("bus/pci/devices")) {
            let (Some(class), Some(vendor)) = (read_hex(&link.join("class")), read_hex(&link.join("vendor"))) else {
                continue;
            };
            if !matches!(class >> 8, 0x0300 | 0x0302) {
                continue;
            }
            let Some(pci) = pci_device(&link, devices_root) else { continue };
            match vendor {
                0x10de => cuda.push(pci),
                0x1002 => hip.push(pci),
                _ => {}
            }
        }
        let gpus = cuda
            .into_iter()
            .enumerate()
            .map(|(i, pci)| Gpu { location: format!("cuda:{i}"), pci })
            .chain(hip.into_iter().enumerate().map(|(i, pci)| Gpu { location: format!("hip:{i}"), pci }))
            .collect();

        let mut numa_nodes = BTreeMap::new();
        for (name, dir) in sorted_entries(&sysfs_root.join("devices/system/node")) {
            let Some(id) = name.strip_prefix("node").and_then(|n| n.parse::<u32>().ok()) else { continue };
            let cpus = read_trim(&dir.join("cpulist")).and_then(|s| parse_cpulist(&s).ok()).unwrap_or_default();
            numa_nodes.insert(id, cpus);
        }
        if numa_nodes.is_empty() {
            numa_nodes.insert(0, Vec::new());
        }
        Topology { nics, gpus, numa_nodes }
    }

    /// Renames the GPUs to the ordinals their drivers use: sysfs numbers them in PCI address order, but CUDA
    /// numbers them fastest first (or as `CUDA_VISIBLE_DEVICES` says) and registrations name that ordinal.
    /// `ordinals` lists `(location, PCI address)` as the drivers report them (`MemoryDevice::pci_address`);
    /// a GPU of a vendor that reports its ordinals but is not among them (hidden from this process) is
    /// dropped. Vendors that report nothing keep the PCI order.
    pub fn with_driver_ordinals(mut self, ordinals: &[(String, String)]) -> Topology {
        let vendor = |loc: &str| loc.split(':').next().unwrap_or_default().to_string();
        let reporting: Vec<String> = ordinals.iter().map(|(loc, _)| vendor(loc)).collect();
        self.gpus.retain_mut(|gpu| {
            if !reporting.contains(&vendor(&gpu.location)) {
                return true;
            }
            let addr = gpu.pci.addr.to_ascii_lowercase();
            match ordinals
                .iter()
                .find(|(loc, pci)| vendor(loc) == vendor(&gpu.location) && pci.to_ascii_lowercase() == addr)
            {
                Some((loc, _)) => {
                    gpu.location = loc.clone();
                    true
                }
                None => false,
            }
        });
        self
    }

    fn nic_node(&self, nic: &Nic) -> Option<u32> {
        match nic.pci.as_ref().and_then(|p| p.numa_node) {
            Some(n) => Some(n),
            None if self.numa_nodes.len() == 1 => self.numa_nodes.keys().next().copied(),
            None => None,
        }
    }

    /// The priority matrix over the NICs named in `usable`, listed by name within each row; NICs
    /// in `usable` that sysfs does not know become fallbacks everywhere.
    pub fn priority_matrix(&self, usable: &[String]) -> PriorityMatrix {
        let nics: Vec<&Nic> = self.nics.iter().filter(|n| usable.contains(&n.name)).collect();
        let unknown: Vec<String> =
            usable.iter().filter(|u| !self.nics.iter().any(|n| &n.name == *u)).cloned().collect();
        let mut entries = BTreeMap::new();
        let split = |is_preferred: &dyn Fn(&Nic) -> bool| -> MatrixEntry {
            let (p, f): (Vec<&&Nic>, Vec<&&Nic>) = nics.iter().partition(|n| is_preferred(n));
            MatrixEntry {
                preferred: p.into_iter().map(|n| n.name.clone()).collect(),
                fallback: f.into_iter().map(|n| n.name.clone()).chain(unknown.iter().cloned()).collect(),
            }
        };
        for node in self.numa_nodes.keys() {
            entries.insert(format!("cpu:{node}"), split(&|n: &Nic| self.nic_node(n) == Some(*node)));
        }
        for gpu in &self.gpus {
            let relation = |n: &Nic| n.pci.as_ref().map(|p| pci_relation(&gpu.pci.path, &p.path));
            let best = nics.iter().filter_map(|n| relation(n)).filter(|r| r.shared_depth >= 2).map(|r| r.hops).min();
            let entry = match best {
                Some(hops) => split(&|n: &Nic| relation(n).is_some_and(|r| r.shared_depth >= 2 && r.hops == hops)),
                None => {
                    let node = gpu.pci.numa_node;
                    split(&|n: &Nic| node.is_some() && self.nic_node(n) == node)
                }
            };
            entries.insert(gpu.location.clone(), entry);
        }
        PriorityMatrix { entries }
    }

    /// CPUs of the NUMA node closest to NIC `name` (empty when unknown).
    pub fn cpus_near(&self, name: &str) -> Vec<u32> {
        self.nics
            .iter()
            .find(|n| n.name == name)
            .and_then(|n| self.nic_node(n))
            .and_then(|node| self.numa_nodes.get(&node).cloned())
            .unwrap_or_default()
    }
}

/// One row of the priority matrix.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MatrixEntry {
    /// NICs to use first.
    pub preferred: Vec<String>,
    /// NICs to use when the preferred ones fail or do not exist.
    pub fallback: Vec<String>,
}

/// Upstream's `priority_matrix`: memory location -> `[[preferred], [fallback]]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PriorityMatrix {
    /// Rows, by location name.
    pub entries: BTreeMap<String, MatrixEntry>,
}

impl PriorityMatrix {
    /// JSON as published in the descriptor.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        for (k, e) in &self.entries {
            map.insert(k.clone(), serde_json::json!([e.preferred, e.fallback]));
        }
        Value::Object(map)
    }

    /// Parses a published matrix: an object whose values are arrays of exactly two arrays of names.
    pub fn from_json(v: &Value) -> Result<PriorityMatrix> {
        let obj = v.as_object().ok_or_else(|| Error::MalformedJson("priority_matrix is not an object".into()))?;
        let names = |v: &Value, key: &str| -> Result<Vec<String>> {
            v.as_array()
                .ok_or_else(|| Error::MalformedJson(format!("priority_matrix[{key:?}]: row is not an array")))?
                .iter()
                .map(|n| {
                    n.as_str().map(String::from).ok_or_else(|| {
                        Error::MalformedJson(format!("priority_matrix[{key:?}]: device name is not a string"))
                    })
                })
                .collect()
        };
        let mut entries = BTreeMap::new();
        for (key, row) in obj {
            match row.as_array().map(Vec::as_slice) {
                Some([p, f]) => {
                    entries.insert(key.clone(), MatrixEntry { preferred: names(p, key)?, fallback: names(f, key)? });
                }
                _ => {
                    return Err(Error::MalformedJson(format!(
                        "priority_matrix[{key:?}] must be [[preferred...], [fallback...]]"
                    )));
                }
            }
        }
        Ok(PriorityMatrix { entries })
    }

    /// Every NIC named in the matrix, in upstream's resolution order (rows by name, preferred
    /// before fallback, first appearance). Upstream indexes `rkey`/`lkey` and `devices` this way,
    /// so a descriptor publishes its devices in this order.
    pub fn device_order(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for e in self.entries.values() {
            for n in e.preferred.iter().chain(&e.fallback) {
                if !out.contains(n) {
                    out.push(n.clone());
                }
            }
        }
        out
    }

    /// Resolves names to indices in `devices` (names not in `devices` are dropped).
    pub fn resolve(&self, devices: &[String]) -> ResolvedMatrix {
        let index: HashMap<&str, usize> = devices.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
        let ids = |names: &[String]| -> Vec<usize> {
            let mut v: Vec<usize> = Vec::new();
            for n in names {
                if let Some(&i) = index.get(n.as_str()) {
                    if !v.contains(&i) {
                        v.push(i);
                    }
                }
            }
            v
        };
        let rows: HashMap<String, Arc<Rails>> = self
            .entries
            .iter()
            .map(|(k, e)| {
                let preferred = ids(&e.preferred);
                let fallback: Vec<usize> = ids(&e.fallback).into_iter().filter(|i| !preferred.contains(i)).collect();
                (k.clone(), Arc::new(Rails { preferred, fallback }))
            })
            .collect();
        let by_location = rows.iter().filter_map(|(k, r)| k.parse::<Location>().ok().map(|l| (l, r.clone()))).collect();
        let all = Arc::new(Rails { preferred: (0..devices.len()).collect(), fallback: Vec::new() });
        ResolvedMatrix { rows, by_location, all }
    }
}

/// NIC indices to use for one memory location.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rails {
    /// Tried first.
    pub preferred: Vec<usize>,
    /// Tried after every preferred one.
    pub fallback: Vec<usize>,
}

impl Rails {
    /// Total number of NICs.
    pub fn len(&self) -> usize {
        self.preferred.len() + self.fallback.len()
    }

    /// True when no NIC serves this location.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `i`-th NIC in try order (preferred first), modulo the total.
    pub fn nth(&self, i: usize) -> Option<usize> {
        let n = self.len();
        if n == 0 {
            return None;
        }
        let i = i % n;
        Some(if i < self.preferred.len() { self.preferred[i] } else { self.fallback[i - self.preferred.len()] })
    }
}

/// A priority matrix resolved against a device list, for the data path.
#[derive(Debug, Clone, Default)]
pub struct ResolvedMatrix {
    rows: HashMap<String, Arc<Rails>>,
    by_location: HashMap<Location, Arc<Rails>>,
    all: Arc<Rails>,
}

impl ResolvedMatrix {
    /// Rails for `location` (`cpu:0`, `cuda:1`, ...). Unknown locations (or `*`) get every device;
    /// a row without any device also falls back to every device.
    pub fn rails(&self, location: &str) -> &Arc<Rails> {
        match self.rows.get(location) {
            Some(r) if !r.is_empty() => r,
            _ => &self.all,
        }
    }

    /// Like [`ResolvedMatrix::rails`] for a parsed location (plain `cpu` means `cpu:0`), without
    /// allocating.
    pub fn rails_at(&self, location: &Location) -> &Arc<Rails> {
        let found = match location {
            Location::Cpu(None) => self.by_location.get(&Location::Cpu(Some(0))),
            other => self.by_location.get(other),
        };
        match found {
            Some(r) if !r.is_empty() => r,
            _ => &self.all,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<String> {
        s.split('/').map(String::from).collect()
    }

    #[test]
    fn pci_relation_counts_shared_bridges_and_hops() {
        let gpu = p("pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/0000:03:00.0");
        let nic_same_switch = p("pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:04:00.0");
        let nic_same_rc = p("pci0000:00/0000:00:02.0/0000:06:00.0");
        let nic_other = p("pci0000:80/0000:80:01.0/0000:81:00.0");
        assert_eq!(pci_relation(&gpu, &nic_same_switch), PciRelation { shared_depth: 3, hops: 4 });
        assert_eq!(pci_relation(&gpu, &nic_same_rc), PciRelation { shared_depth: 1, hops: 6 });
        assert_eq!(pci_relation(&gpu, &nic_other), PciRelation { shared_depth: 0, hops: 8 });
        assert_eq!(pci_relation(&gpu, &gpu).hops, 0);
    }

    #[test]
    fn cpulists_parse() {
        assert_eq!(parse_cpulist("0-3,8,10-11\n").unwrap(), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpulist("").unwrap(), Vec::<u32>::new());
        assert!(parse_cpulist("3-1").is_err());
        assert!(parse_cpulist("a").is_err());
    }

    #[test]
    fn matrix_json_round_trip_and_validation() {
        let v: Value =
            serde_json::from_str(r#"{"cpu:0":[["mlx5_0"],["mlx5_1"]],"cuda:0":[[],["mlx5_1","mlx5_0"]]}"#).unwrap();
        let m = PriorityMatrix::from_json(&v).unwrap();
        assert_eq!(m.to_json(), v);
        assert_eq!(m.device_order(), vec!["mlx5_0".to_string(), "mlx5_1".to_string()]);
        for bad in [
            r#"[]"#,
            r#"{"cpu:0":[["a"]]}"#,
            r#"{"cpu:0":[["a"],["b"],[]]}"#,
            r#"{"cpu:0":[["a"],[1]]}"#,
            r#"{"cpu:0":"a"}"#,
        ] {
            let v: Value = serde_json::from_str(bad).unwrap();
            assert!(matches!(PriorityMatrix::from_json(&v), Err(Error::MalformedJson(_))), "{bad}");
        }
    }

    #[test]
    fn resolution_follows_device_list_and_falls_back_to_all() {
        let v: Value = serde_json::from_str(
            r#"{"cpu:0":[["mlx5_1"],["mlx5_0","mlx5_9"]],"cpu:1":[[],[]],"cuda:0":[["mlx5_0"],["mlx5_0","mlx5_1"]]}"#,
        )
        .unwrap();
        let m = PriorityMatrix::from_json(&v).unwrap().resolve(&["mlx5_0".into(), "mlx5_1".into()]);
        assert_eq!(**m.rails("cpu:0"), Rails { preferred: vec![1], fallback: vec![0] });
        assert_eq!(**m.rails("cuda:0"), Rails { preferred: vec![0], fallback: vec![1] });
        assert_eq!(**m.rails("cpu:1"), Rails { preferred: vec![0, 1], fallback: vec![] });
        assert_eq!(**m.rails("*"), Rails { preferred: vec![0, 1], fallback: vec![] });
        assert_eq!(**m.rails_at(&Location::Cpu(None)), Rails { preferred: vec![1], fallback: vec![0] });
        assert_eq!(**m.rails_at(&Location::Device(mooncake_core::MemoryKind::Cuda, 0)), **m.rails("cuda:0"));
        assert_eq!(**m.rails_at(&Location::Detect), **m.rails("*"));
        let r = m.rails("cpu:0");
        assert_eq!((r.nth(0), r.nth(1), r.nth(2)), (Some(1), Some(0), Some(1)));
        assert_eq!(Rails::default().nth(0), None);
    }
}
