//! Where GPUs sit relative to each other and to RDMA NICs.
//!
//! Three sources, all usable without a GPU on this machine except the NVML one:
//! - [`parse_topo_matrix`]: recorded `nvidia-smi topo -m` output (link kinds `X`, `NV#`, `PIX`,
//!   `PXB`, `PHB`, `NODE`, `SYS`, plus the CPU/NUMA affinity columns);
//! - [`GpuTopology::from_nvml`]: the live GPUs from NVML (PCI address, NUMA node from sysfs,
//!   NVLink peers), with a clean [`TopologyError::Nvml`] where NVML cannot start;
//! - [`nic_affinity`]: for each `cuda:N`, the RDMA NICs under a sysfs root ordered best first by
//!   PCIe relation, as upstream's topology-matrix entry `"cuda:N": [[preferred], [others]]`.
//!
//! GPU numbers in `nvidia-smi` and NVML follow PCI order; CUDA ordinals follow it only with
//! `CUDA_DEVICE_ORDER=PCI_BUS_ID`. Match GPUs by PCI address (see
//! [`crate::CudaDevice::nic_affinity`], which does).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// Why topology could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// The `nvidia-smi topo -m` text is not in the expected shape.
    #[error("nvidia-smi topo -m output, line {line}: {message}")]
    Parse {
        /// 1-based line number (0 when the whole text is at fault).
        line: usize,
        /// What was wrong.
        message: String,
    },
    /// NVML could not be used (no NVIDIA driver, or a call failed).
    #[error("NVML unavailable: {0}")]
    Nvml(String),
    /// A sysfs file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl From<TopologyError> for mooncake_core::Error {
    fn from(e: TopologyError) -> Self {
        match e {
            TopologyError::Nvml(reason) => mooncake_core::Error::unavailable(format!("NVML: {reason}")),
            TopologyError::Parse { .. } => mooncake_core::Error::InvalidArgument(e.to_string()),
            TopologyError::Io { path, source } => mooncake_core::Error::Io(std::sync::Arc::new(std::io::Error::new(
                source.kind(),
                format!("{}: {source}", path.display()),
            ))),
        }
    }
}

/// A PCI address in the kernel's form, lower case (`0000:04:00.0`), from any of the forms the
/// driver, NVML and sysfs print (`00000000:04:00.0`, `0000:04:00.0`, `04:00.0`, upper case).
pub fn normalize_pci_bus_id(s: &str) -> Option<String> {
    let s = s.trim().to_ascii_lowercase();
    let parts: Vec<&str> = s.split(':').collect();
    let (domain, bus, devfn) = match parts.as_slice() {
        [d, b, df] => (u32::from_str_radix(d, 16).ok()?, *b, *df),
        [b, df] => (0, *b, *df),
        _ => return None,
    };
    let (dev, func) = devfn.split_once('.')?;
    let bus = u8::from_str_radix(bus, 16).ok()?;
    let dev = u8::from_str_radix(dev, 16).ok().filter(|d| *d < 32)?;
    let func = u8::from_str_radix(func, 16).ok().filter(|f| *f < 8)?;
    Some(format!("{domain:04x}:{bus:02x}:{dev:02x}.{func:x}"))
}

/// How two devices are connected, as `nvidia-smi topo -m` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Link {
    /// `X`: the device itself.
    Itself,
    /// `NV#`: a bonded set of `#` NVLinks.
    NvLink(u32),
    /// `PIX`: at most one PCIe bridge between them.
    Pix,
    /// `PXB`: several PCIe bridges, no host bridge.
    Pxb,
    /// `PHB`: through a PCIe host bridge (the CPU's root complex).
    Phb,
    /// `NODE`: through the interconnect between host bridges of one NUMA node.
    Node,
    /// `SYS`: through the inter-socket interconnect (QPI/UPI/xGMI).
    Sys,
}

impl Link {
    /// Parses one cell (`X`, `NV18`, `PIX`, ...; `SOC` and `PSB` of old drivers are read as `SYS`
    /// and `PXB`).
    pub fn parse(cell: &str) -> Option<Link> {
        let c = cell.trim();
        Some(match c {
            "X" => Link::Itself,
            "PIX" => Link::Pix,
            "PXB" | "PSB" => Link::Pxb,
            "PHB" => Link::Phb,
            "NODE" => Link::Node,
            "SYS" | "SOC" => Link::Sys,
            _ => Link::NvLink(c.strip_prefix("NV")?.parse().ok().filter(|n| *n > 0)?),
        })
    }

    /// The PCIe relation this link means for NIC choice, and a tie-breaker (fewer bridges first);
    /// `None` for `X` and NVLink.
    pub fn pci_relation(self) -> Option<(PciRelation, u32)> {
        match self {
            Link::Pix => Some((PciRelation::SameSwitch, 0)),
            Link::Pxb => Some((PciRelation::SameSwitch, 1)),
            Link::Phb => Some((PciRelation::SameRootComplex, 0)),
            Link::Node => Some((PciRelation::SameNumaNode, 0)),
            Link::Sys => Some((PciRelation::Other, 0)),
            Link::Itself | Link::NvLink(_) => None,
        }
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Link::Itself => f.write_str("X"),
            Link::NvLink(n) => write!(f, "NV{n}"),
            Link::Pix => f.write_str("PIX"),
            Link::Pxb => f.write_str("PXB"),
            Link::Phb => f.write_str("PHB"),
            Link::Node => f.write_str("NODE"),
            Link::Sys => f.write_str("SYS"),
        }
    }
}

/// How a NIC sits relative to a GPU on PCIe, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PciRelation {
    /// Below a common PCIe switch (or root port): peer-to-peer traffic stays off the CPU (`PIX`/`PXB`).
    SameSwitch,
    /// Under the same host bridge (`PHB`).
    SameRootComplex,
    /// Different host bridges of one NUMA node (`NODE`).
    SameNumaNode,
    /// Across sockets, or unknown (`SYS`).
    Other,
}

/// One NIC as ranked for one GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicRank {
    /// RDMA device name (`mlx5_0`).
    pub name: String,
    /// Its PCIe relation to the GPU.
    pub relation: PciRelation,
    /// PCIe hops between them inside that relation (0 when unknown); fewer is better.
    pub hops: u32,
}

impl NicRank {
    fn key(&self) -> (PciRelation, u32, &str) {
        (self.relation, self.hops, &self.name)
    }
}

/// Sorts NICs best first and splits them into upstream's `[[preferred], [others]]`: the preferred
/// are every NIC as good as the best one.
pub fn preferred_split(mut nics: Vec<NicRank>) -> (Vec<NicRank>, Vec<NicRank>) {
    nics.sort_by(|a, b| a.key().cmp(&b.key()));
    let best = nics.first().map(|n| (n.relation, n.hops));
    let cut = nics.iter().take_while(|n| Some((n.relation, n.hops)) == best).count();
    let others = nics.split_off(cut);
    (nics, others)
}

/// Upstream's topology-matrix JSON from each `cuda:N` key's ranked NICs.
pub fn affinity_json(ranked: impl IntoIterator<Item = (String, Vec<NicRank>)>) -> Value {
    let mut map = serde_json::Map::new();
    for (key, nics) in ranked {
        let (preferred, others) = preferred_split(nics);
        let names = |v: Vec<NicRank>| v.into_iter().map(|n| n.name).collect::<Vec<_>>();
        map.insert(key, json!([names(preferred), names(others)]));
    }
    Value::Object(map)
}

/// A parsed `nvidia-smi topo -m` matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopoMatrix {
    /// Row/column names as printed (`GPU0`, `NIC0`, or `mlx5_0` in old drivers).
    devices: Vec<String>,
    /// `NIC0` -> `mlx5_0` from the NIC legend.
    nic_names: BTreeMap<String, String>,
    /// `links[i][j]`: how `devices[i]` reaches `devices[j]`.
    links: Vec<Vec<Link>>,
    /// Affinity column names (`CPU Affinity`, `NUMA Affinity`, `GPU NUMA ID`).
    affinity_columns: Vec<String>,
    /// Per device, its affinity values by column (absent when printed empty).
    affinity: Vec<BTreeMap<String, String>>,
}

fn is_gpu(name: &str) -> bool {
    name.strip_prefix("GPU").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// One parsed matrix row: links to every device, and affinity values by column.
type Row = (Vec<Link>, BTreeMap<String, String>);

/// Removes terminal escape sequences (`nvidia-smi` underlines the header on a terminal).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

fn split_row(line: &str) -> Vec<String> {
    if line.contains('\t') {
        line.split('\t').map(|f| f.trim().to_string()).collect()
    } else {
        line.split_whitespace().map(str::to_string).collect()
    }
}

/// Parses `nvidia-smi topo -m` output (tab-separated as the tool prints it; whitespace-separated
/// copies are accepted too), legend and NIC legend included.
pub fn parse_topo_matrix(text: &str) -> Result<TopoMatrix, TopologyError> {
    let text = strip_ansi(text);
    let lines: Vec<&str> = text.lines().collect();
    let header_at = lines
        .iter()
        .position(|l| {
            // The header starts with a GPU name followed by another name; rows follow theirs with a link.
            let mut t = l.split_whitespace();
            t.next().is_some_and(is_gpu) && t.next().is_none_or(|second| Link::parse(second).is_none())
        })
        .ok_or(TopologyError::Parse { line: 0, message: "no header row naming GPU0".into() })?;
    let header = lines[header_at];
    let mut columns: Vec<String> = split_row(header).into_iter().filter(|c| !c.is_empty()).collect();
    if !header.contains('\t') {
        // Whitespace copy: glue the two-word affinity titles back together.
        let joined = columns.join(" ");
        let cut = joined.find(" CPU").or_else(|| joined.find(" NUMA")).unwrap_or(joined.len());
        let (devs, rest) = joined.split_at(cut);
        columns = devs.split_whitespace().map(str::to_string).collect();
        for title in ["CPU Affinity", "NUMA Affinity", "GPU NUMA ID"] {
            if rest.contains(title) {
                columns.push(title.to_string());
            }
        }
    }
    let n = columns.iter().position(|c| c.contains("Affinity") || c.contains("NUMA")).unwrap_or(columns.len());
    let devices: Vec<String> = columns[..n].to_vec();
    let affinity_columns: Vec<String> = columns[n..].to_vec();
    if devices.is_empty() {
        return Err(TopologyError::Parse { line: header_at + 1, message: "header names no device".into() });
    }
    let mut rows: Vec<Option<Row>> = vec![None; devices.len()];
    let mut at = header_at + 1;
    while at < lines.len() {
        let line = lines[at];
        let fields = split_row(line);
        let Some(name) = fields.first().filter(|f| !f.is_empty()) else { break };
        let Some(i) = devices.iter().position(|d| d == name) else { break };
        let cells = &fields[1..];
        if cells.len() < n {
            return Err(TopologyError::Parse {
                line: at + 1,
                message: format!("row {name} has {} cells for {n} devices", cells.len()),
            });
        }
        let mut links = Vec::with_capacity(n);
        for (j, cell) in cells[..n].iter().enumerate() {
            links.push(Link::parse(cell).ok_or_else(|| TopologyError::Parse {
                line: at + 1,
                message: format!("unknown link kind {cell:?} between {name} and {}", devices[j]),
            })?);
        }
        if links[i] != Link::Itself {
            return Err(TopologyError::Parse { line: at + 1, message: format!("{name} does not reach itself as X") });
        }
        let values = cells[n..].iter().filter(|v| !v.is_empty());
        let affinity = affinity_columns.iter().cloned().zip(values.cloned()).collect();
        rows[i] = Some((links, affinity));
        at += 1;
    }
    let mut links = Vec::with_capacity(n);
    let mut affinity = Vec::with_capacity(n);
    for (i, row) in rows.into_iter().enumerate() {
        let (l, a) = row.ok_or_else(|| TopologyError::Parse {
            line: 0,
            message: format!("no row for {} (the matrix is cut short)", devices[i]),
        })?;
        links.push(l);
        affinity.push(a);
    }
    let mut nic_names = BTreeMap::new();
    if let Some(legend) = lines.iter().position(|l| l.trim() == "NIC Legend:") {
        for l in &lines[legend + 1..] {
            if let Some((k, v)) = l.trim().split_once(':') {
                if devices.iter().any(|d| d == k.trim()) {
                    nic_names.insert(k.trim().to_string(), v.trim().to_string());
                }
            }
        }
    }
    Ok(TopoMatrix { devices, nic_names, links, affinity_columns, affinity })
}

impl TopoMatrix {
    /// GPU names (`GPU0`, ...), in matrix order.
    pub fn gpus(&self) -> Vec<&str> {
        self.devices.iter().map(String::as_str).filter(|d| is_gpu(d)).collect()
    }

    /// NIC names, resolved through the NIC legend (`mlx5_0`, ...), in matrix order.
    pub fn nics(&self) -> Vec<&str> {
        self.devices.iter().filter(|d| !is_gpu(d)).map(|d| self.nic_name(d)).collect()
    }

    fn nic_name<'a>(&'a self, column: &'a str) -> &'a str {
        self.nic_names.get(column).map(String::as_str).unwrap_or(column)
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.devices.iter().position(|d| d == name || self.nic_name(d) == name)
    }

    /// How `a` reaches `b` (names as printed, or NIC names from the legend).
    pub fn link(&self, a: &str, b: &str) -> Option<Link> {
        Some(self.links[self.index(a)?][self.index(b)?])
    }

    /// The affinity columns the tool printed (`CPU Affinity`, `NUMA Affinity`, ...).
    pub fn affinity_columns(&self) -> &[String] {
        &self.affinity_columns
    }

    /// One affinity value of a device (`"0-55,112-167"` for `CPU Affinity`); `None` when empty.
    pub fn affinity(&self, device: &str, column: &str) -> Option<&str> {
        self.affinity[self.index(device)?].get(column).map(String::as_str)
    }

    /// The NUMA node of a device from `NUMA Affinity`, when it is a single node.
    pub fn numa_node(&self, device: &str) -> Option<u32> {
        self.affinity(device, "NUMA Affinity")?.parse().ok()
    }

    /// NICs of `gpu` (`GPU0`) ranked best first by their link.
    pub fn ranked_nics(&self, gpu: &str) -> Vec<NicRank> {
        let Some(g) = self.index(gpu) else { return Vec::new() };
        let mut v: Vec<NicRank> = (0..self.devices.len())
            .filter(|&j| !is_gpu(&self.devices[j]))
            .filter_map(|j| {
                let (relation, hops) = self.links[g][j].pci_relation()?;
                Some(NicRank { name: self.nic_name(&self.devices[j]).to_string(), relation, hops })
            })
            .collect();
        v.sort_by(|a, b| a.key().cmp(&b.key()));
        v
    }

    /// Upstream's topology-matrix entries, `"cuda:N": [[preferred], [others]]` for `GPUN` (the
    /// tool's numbering, which is CUDA's with `CUDA_DEVICE_ORDER=PCI_BUS_ID`).
    pub fn nic_affinity(&self) -> Value {
        affinity_json(self.gpus().into_iter().map(|g| (format!("cuda:{}", &g[3..]), self.ranked_nics(g))))
    }
}

/// One GPU as NVML sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// NVML index (PCI order).
    pub index: u32,
    /// Product name.
    pub name: String,
    /// PCI address, lower case (`0000:04:00.0`).
    pub pci_bus_id: String,
    /// NUMA node from sysfs (`None` when the kernel reports -1 or nothing).
    pub numa_node: Option<u32>,
    /// PCI addresses at the far end of each active NVLink (a peer GPU, or an NVSwitch).
    pub nvlink_remotes: Vec<String>,
}

/// The GPUs of this machine and their NVLinks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GpuTopology {
    /// Every GPU, in NVML order.
    pub gpus: Vec<GpuInfo>,
}

/// Most NVLinks a GPU has (NVML's `NVML_NVLINK_MAX_LINKS`).
const NVLINK_MAX_LINKS: u32 = 18;

/// The NUMA node of a PCI device from `<sysfs_root>/bus/pci/devices/<bus id>/numa_node`.
pub fn pci_numa_node(sysfs_root: &Path, pci_bus_id: &str) -> Option<u32> {
    read_numa(&sysfs_root.join("bus/pci/devices").join(pci_bus_id))
}

fn read_numa(device_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(device_dir.join("numa_node"))
        .ok()?
        .trim()
        .parse::<i64>()
        .ok()
        .and_then(|n| u32::try_from(n).ok())
}

impl GpuTopology {
    /// Reads the GPUs from NVML, NUMA nodes from `/sys`.
    pub fn from_nvml() -> Result<GpuTopology, TopologyError> {
        GpuTopology::from_nvml_with_sysfs(Path::new("/sys"))
    }

    /// Reads the GPUs from NVML, NUMA nodes from the sysfs tree at `sysfs_root`.
    pub fn from_nvml_with_sysfs(sysfs_root: &Path) -> Result<GpuTopology, TopologyError> {
        use nvml_wrapper::Nvml;
        let nvml = Nvml::init().map_err(|e| TopologyError::Nvml(format!("nvmlInit failed: {e}")))?;
        let count = nvml.device_count().map_err(|e| TopologyError::Nvml(format!("nvmlDeviceGetCount: {e}")))?;
        let mut gpus = Vec::new();
        for index in 0..count {
            let dev = nvml
                .device_by_index(index)
                .map_err(|e| TopologyError::Nvml(format!("nvmlDeviceGetHandleByIndex({index}): {e}")))?;
            let pci = dev.pci_info().map_err(|e| TopologyError::Nvml(format!("nvmlDeviceGetPciInfo({index}): {e}")))?;
            let pci_bus_id = normalize_pci_bus_id(&pci.bus_id).unwrap_or_else(|| pci.bus_id.to_ascii_lowercase());
            let mut nvlink_remotes = Vec::new();
            for link in 0..NVLINK_MAX_LINKS {
                let l = dev.link_wrapper_for(link);
                match l.is_active() {
                    Ok(true) => {
                        if let Ok(remote) = l.remote_pci_info() {
                            nvlink_remotes.push(
                                normalize_pci_bus_id(&remote.bus_id).unwrap_or(remote.bus_id.to_ascii_lowercase()),
                            );
                        }
                    }
                    Ok(false) => {}
                    // No NVLink on this GPU (PCIe cards) or past its last link.
                    Err(_) => break,
                }
            }
            gpus.push(GpuInfo {
                index,
                name: dev.name().unwrap_or_default(),
                numa_node: pci_numa_node(sysfs_root, &pci_bus_id),
                pci_bus_id,
                nvlink_remotes,
            });
        }
        Ok(GpuTopology { gpus })
    }

    /// The GPU at a PCI address (any spelling [`normalize_pci_bus_id`] accepts).
    pub fn by_pci(&self, pci_bus_id: &str) -> Option<&GpuInfo> {
        let id = normalize_pci_bus_id(pci_bus_id)?;
        self.gpus.iter().find(|g| g.pci_bus_id == id)
    }

    /// Direct NVLinks between two GPUs (by PCI address).
    pub fn nvlinks_between(&self, a: &str, b: &str) -> u32 {
        let (Some(ga), Some(gb)) = (self.by_pci(a), self.by_pci(b)) else { return 0 };
        ga.nvlink_remotes.iter().filter(|r| **r == gb.pci_bus_id).count() as u32
    }

    /// True when two GPUs reach each other over NVLink: a direct link, or both linked to NVSwitches
    /// (a link whose far end is not a GPU of this machine).
    pub fn nvlink_connected(&self, a: &str, b: &str) -> bool {
        let (Some(ga), Some(gb)) = (self.by_pci(a), self.by_pci(b)) else { return false };
        if ga.pci_bus_id == gb.pci_bus_id {
            return true;
        }
        let on_switch = |g: &GpuInfo| g.nvlink_remotes.iter().any(|r| self.gpus.iter().all(|o| o.pci_bus_id != *r));
        self.nvlinks_between(a, b) > 0 || (on_switch(ga) && on_switch(gb))
    }
}

/// A GPU to rank NICs for: its CUDA ordinal and PCI address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuPci {
    /// CUDA ordinal (the key is `cuda:<ordinal>`).
    pub ordinal: u32,
    /// PCI address (`0000:04:00.0`).
    pub pci_bus_id: String,
}

/// A device's place in the PCI tree: host bridge (`pci0000:00`) and the bridges/devices below it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct PciPath {
    host_bridge: Option<String>,
    chain: Vec<String>,
    numa: Option<u32>,
}

fn pci_path(device_link: &Path) -> Result<PciPath, TopologyError> {
    let real = std::fs::canonicalize(device_link)
        .map_err(|source| TopologyError::Io { path: device_link.to_path_buf(), source })?;
    let mut host_bridge = None;
    let mut chain = Vec::new();
    for c in real.components() {
        let c = c.as_os_str().to_string_lossy();
        if host_bridge.is_none() {
            let is_bridge = c.strip_prefix("pci").is_some_and(|r| {
                r.split_once(':')
                    .is_some_and(|(d, b)| u32::from_str_radix(d, 16).is_ok() && u8::from_str_radix(b, 16).is_ok())
            });
            if is_bridge {
                host_bridge = Some(c.into_owned());
            }
        } else if let Some(bdf) = normalize_pci_bus_id(&c).filter(|_| c.matches(':').count() == 2) {
            chain.push(bdf);
        } else {
            break;
        }
    }
    Ok(PciPath { host_bridge, chain, numa: read_numa(&real) })
}

/// How a NIC relates to a GPU, from their PCI paths.
fn relation(gpu: &PciPath, nic: &PciPath) -> (PciRelation, u32) {
    if gpu.host_bridge.is_some() && gpu.host_bridge == nic.host_bridge {
        let common = gpu.chain.iter().zip(&nic.chain).take_while(|(a, b)| a == b).count();
        let hops = (gpu.chain.len() - common + nic.chain.len() - common) as u32;
        if common > 0 {
            return (PciRelation::SameSwitch, hops);
        }
        return (PciRelation::SameRootComplex, hops);
    }
    if gpu.numa == nic.numa { (PciRelation::SameNumaNode, 0) } else { (PciRelation::Other, 0) }
}

/// The RDMA NICs under `<sysfs_root>/class/infiniband`, by name (none when the directory is absent).
fn rdma_nics(sysfs_root: &Path) -> Result<Vec<(String, PciPath)>, TopologyError> {
    let dir = sysfs_root.join("class/infiniband");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(TopologyError::Io { path: dir, source }),
    };
    let mut nics = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| TopologyError::Io { path: dir.clone(), source })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let device = entry.path().join("device");
        // A NIC without a PCI device (soft RoCE) has no place in the tree: ranked last.
        let path = if device.exists() { pci_path(&device)? } else { PciPath::default() };
        nics.push((name, path));
    }
    nics.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(nics)
}

/// For each GPU, the RDMA NICs under `sysfs_root` (normally `/sys`) ranked best first: same PCIe
/// switch, then same root complex, then same NUMA node, then the rest; fewer PCIe hops first within
/// a class, then by name.
pub fn rank_nics(gpus: &[GpuPci], sysfs_root: &Path) -> Result<Vec<(GpuPci, Vec<NicRank>)>, TopologyError> {
    let nics = rdma_nics(sysfs_root)?;
    let mut out = Vec::new();
    for gpu in gpus {
        let id = normalize_pci_bus_id(&gpu.pci_bus_id).unwrap_or_else(|| gpu.pci_bus_id.clone());
        let link = sysfs_root.join("bus/pci/devices").join(&id);
        let gpu_path = pci_path(&link)?;
        let mut ranked: Vec<NicRank> = nics
            .iter()
            .map(|(name, p)| {
                let (relation, hops) = relation(&gpu_path, p);
                NicRank { name: name.clone(), relation, hops }
            })
            .collect();
        ranked.sort_by(|a, b| a.key().cmp(&b.key()));
        out.push((gpu.clone(), ranked));
    }
    Ok(out)
}

/// Upstream's topology-matrix entries for the GPUs: `{"cuda:N": [[preferred nics], [other nics]]}`
/// from the sysfs tree at `sysfs_root`; see [`rank_nics`].
pub fn nic_affinity(gpus: &[GpuPci], sysfs_root: &Path) -> Result<Value, TopologyError> {
    let ranked = rank_nics(gpus, sysfs_root)?;
    Ok(affinity_json(ranked.into_iter().map(|(g, nics)| (format!("cuda:{}", g.ordinal), nics))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_normalize() {
        assert_eq!(normalize_pci_bus_id("00000000:04:00.0").as_deref(), Some("0000:04:00.0"));
        assert_eq!(normalize_pci_bus_id("0000:1B:00.0").as_deref(), Some("0000:1b:00.0"));
        assert_eq!(normalize_pci_bus_id(" 04:00.1\n").as_deref(), Some("0000:04:00.1"));
        assert_eq!(normalize_pci_bus_id("10000:e1:00.0").as_deref(), Some("10000:e1:00.0"));
        for bad in ["", "pci0000:00", "0000:04:00", "0000:04:20.0", "0000:04:00.8", "zz:00.0", "0000:100:00.0"] {
            assert_eq!(normalize_pci_bus_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn link_cells_parse() {
        assert_eq!(Link::parse(" X "), Some(Link::Itself));
        assert_eq!(Link::parse("NV18"), Some(Link::NvLink(18)));
        assert_eq!(Link::parse("NV0"), None);
        assert_eq!(Link::parse("SOC"), Some(Link::Sys));
        assert_eq!(Link::parse("PSB"), Some(Link::Pxb));
        assert_eq!(Link::parse("NVX"), None);
        assert_eq!(Link::parse("FOO"), None);
        for l in [Link::Itself, Link::NvLink(4), Link::Pix, Link::Pxb, Link::Phb, Link::Node, Link::Sys] {
            assert_eq!(Link::parse(&l.to_string()), Some(l));
        }
    }

    #[test]
    fn terminal_escapes_are_ignored() {
        let text =
            "\u{1b}[4m\tGPU0\tNIC0\tCPU Affinity\tNUMA Affinity\u{1b}[0m\nGPU0\t X \tPIX\t0-7\t0\nNIC0\tPIX\t X \n";
        let m = parse_topo_matrix(text).unwrap();
        assert_eq!(m.link("GPU0", "NIC0"), Some(Link::Pix));
        assert_eq!(m.affinity("GPU0", "CPU Affinity"), Some("0-7"));
        assert_eq!(m.numa_node("GPU0"), Some(0));
    }

    #[test]
    fn bad_matrices_name_the_line() {
        let e = parse_topo_matrix("no matrix here").unwrap_err();
        assert!(matches!(e, TopologyError::Parse { line: 0, .. }));
        let e = parse_topo_matrix("\tGPU0\tGPU1\nGPU0\t X \tQPI\nGPU1\tSYS\t X \n").unwrap_err();
        assert!(e.to_string().contains("line 2") && e.to_string().contains("QPI"), "{e}");
        let e = parse_topo_matrix("\tGPU0\tGPU1\nGPU0\t X \tSYS\n").unwrap_err();
        assert!(e.to_string().contains("no row for GPU1"), "{e}");
        let e = parse_topo_matrix("\tGPU0\tGPU1\nGPU0\t X \n").unwrap_err();
        assert!(e.to_string().contains("1 cells for 2 devices"), "{e}");
    }

    #[test]
    fn preferred_are_the_ties_for_best() {
        let r = |name: &str, relation, hops| NicRank { name: name.into(), relation, hops };
        let (p, o) = preferred_split(vec![
            r("mlx5_3", PciRelation::Other, 0),
            r("mlx5_1", PciRelation::SameSwitch, 2),
            r("mlx5_0", PciRelation::SameSwitch, 2),
            r("mlx5_2", PciRelation::SameSwitch, 4),
        ]);
        assert_eq!(p.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["mlx5_0", "mlx5_1"]);
        assert_eq!(o.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["mlx5_2", "mlx5_3"]);
        assert_eq!(preferred_split(vec![]), (vec![], vec![]));
    }

    #[test]
    fn nvlink_peers_direct_and_through_switches() {
        let gpu = |i: u32, bus: &str, remotes: &[&str]| GpuInfo {
            index: i,
            name: "GPU".into(),
            pci_bus_id: bus.into(),
            numa_node: Some(0),
            nvlink_remotes: remotes.iter().map(|s| s.to_string()).collect(),
        };
        // Two GPUs bridged directly with 4 links, a third on PCIe only.
        let t = GpuTopology {
            gpus: vec![
                gpu(0, "0000:04:00.0", &["0000:05:00.0"; 4]),
                gpu(1, "0000:05:00.0", &["0000:04:00.0"; 4]),
                gpu(2, "0000:06:00.0", &[]),
            ],
        };
        assert_eq!(t.nvlinks_between("00000000:04:00.0", "0000:05:00.0"), 4);
        assert!(t.nvlink_connected("0000:04:00.0", "0000:05:00.0"));
        assert!(!t.nvlink_connected("0000:04:00.0", "0000:06:00.0"));
        assert!(t.by_pci("0000:07:00.0").is_none());
        // NVSwitch system: links end at switches, not GPUs.
        let t = GpuTopology {
            gpus: vec![
                gpu(0, "0000:18:00.0", &["0000:c5:00.0", "0000:c6:00.0"]),
                gpu(1, "0000:2a:00.0", &["0000:c5:00.0"]),
            ],
        };
        assert!(t.nvlink_connected("0000:18:00.0", "0000:2a:00.0"));
        assert_eq!(t.nvlinks_between("0000:18:00.0", "0000:2a:00.0"), 0);
    }

    #[test]
    fn nvml_without_a_driver_is_a_clean_error() {
        match GpuTopology::from_nvml() {
            Ok(t) => println!("NVML sees {} GPUs", t.gpus.len()),
            Err(e) => {
                assert!(matches!(e, TopologyError::Nvml(_)), "{e}");
                let core: mooncake_core::Error = e.into();
                assert!(matches!(core, mooncake_core::Error::Unavailable { .. }));
            }
        }
    }
}
