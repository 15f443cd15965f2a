//! Topology from recorded `nvidia-smi topo -m` output and from a sysfs tree built in a temporary
//! directory: runs anywhere, no GPU needed.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use mooncake_device_cuda::topology::{
    GpuPci, Link, PciRelation, nic_affinity, parse_topo_matrix, pci_numa_node, rank_nics,
};
use serde_json::json;

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn dgx_h100_matrix_parses() {
    let m = parse_topo_matrix(&fixture("topo_dgx_h100_nv18.txt")).unwrap();
    assert_eq!(m.gpus(), ["GPU0", "GPU1", "GPU2", "GPU3", "GPU4", "GPU5", "GPU6", "GPU7"]);
    assert_eq!(m.nics(), (0..10).map(|i| format!("mlx5_{i}")).collect::<Vec<_>>());
    assert_eq!(m.link("GPU0", "GPU0"), Some(Link::Itself));
    assert_eq!(m.link("GPU0", "GPU7"), Some(Link::NvLink(18)));
    assert_eq!(m.link("GPU0", "NIC0"), Some(Link::Pix));
    assert_eq!(m.link("GPU0", "mlx5_0"), Some(Link::Pix), "NICs are found by legend name too");
    assert_eq!(m.link("GPU0", "mlx5_1"), Some(Link::Pxb));
    assert_eq!(m.link("mlx5_4", "GPU3"), Some(Link::Node));
    assert_eq!(m.link("GPU4", "mlx5_0"), Some(Link::Sys));
    assert_eq!(m.link("GPU0", "GPU9"), None);
    assert_eq!(m.affinity_columns(), ["CPU Affinity", "NUMA Affinity", "GPU NUMA ID"]);
    assert_eq!(m.affinity("GPU4", "CPU Affinity"), Some("56-111,168-223"));
    assert_eq!(m.affinity("GPU4", "GPU NUMA ID"), Some("N/A"));
    assert_eq!(m.numa_node("GPU0"), Some(0));
    assert_eq!(m.numa_node("GPU7"), Some(1));
    assert_eq!(m.affinity("NIC0", "CPU Affinity"), None, "NIC rows print no affinity");

    let ranked = m.ranked_nics("GPU0");
    assert_eq!(ranked[0].name, "mlx5_0");
    assert_eq!(ranked[0].relation, PciRelation::SameSwitch);
    assert_eq!(ranked[1].name, "mlx5_1");
    assert_eq!(ranked[1].relation, PciRelation::SameSwitch);
    assert_eq!(ranked.last().unwrap().relation, PciRelation::Other);

    let a = m.nic_affinity();
    assert_eq!(
        a["cuda:0"],
        json!([["mlx5_0"], ["mlx5_1", "mlx5_2", "mlx5_3", "mlx5_4", "mlx5_5", "mlx5_6", "mlx5_7", "mlx5_8", "mlx5_9"]])
    );
    assert_eq!(
        a["cuda:5"],
        json!([["mlx5_6"], ["mlx5_5", "mlx5_7", "mlx5_8", "mlx5_9", "mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3", "mlx5_4"]])
    );
    assert_eq!(a.as_object().unwrap().len(), 8);
}

#[test]
fn pcie_two_gpu_matrix_in_the_old_format_parses() {
    let text = fixture("topo_pcie_2gpu.txt");
    let m = parse_topo_matrix(&text).unwrap();
    assert_eq!(m.gpus(), ["GPU0", "GPU1"]);
    assert_eq!(m.nics(), ["mlx5_0", "mlx5_1"]);
    assert_eq!(m.link("GPU0", "GPU1"), Some(Link::Sys));
    assert_eq!(m.link("GPU1", "mlx5_0"), Some(Link::Phb));
    assert_eq!(m.affinity_columns(), ["CPU Affinity", "NUMA Affinity"]);
    assert_eq!(m.affinity("GPU1", "CPU Affinity"), Some("16-31,48-63"));
    assert_eq!(m.numa_node("GPU1"), Some(1));
    assert_eq!(m.numa_node("mlx5_0"), None);
    assert_eq!(m.nic_affinity(), json!({"cuda:0": [["mlx5_1"], ["mlx5_0"]], "cuda:1": [["mlx5_0"], ["mlx5_1"]]}));

    // The same matrix pasted with spaces instead of tabs.
    let spaced = text.replace('\t', "   ");
    let s = parse_topo_matrix(&spaced).unwrap();
    assert_eq!(s.gpus(), m.gpus());
    assert_eq!(s.link("GPU1", "mlx5_0"), Some(Link::Phb));
    assert_eq!(s.affinity("GPU0", "CPU Affinity"), Some("0-15,32-47"));
    assert_eq!(s.nic_affinity(), m.nic_affinity());
}

/// A fake `/sys`: PCI devices under `devices/`, with `bus/pci/devices` and `class/infiniband`
/// symlinks as the kernel makes them.
struct Sysfs {
    root: tempfile::TempDir,
}

impl Sysfs {
    fn new() -> Sysfs {
        Sysfs { root: tempfile::tempdir().unwrap() }
    }

    fn path(&self) -> &Path {
        self.root.path()
    }

    /// Creates `devices/<tree>` (the last component is the device) with its numa_node.
    fn pci(&self, tree: &str, numa: i32) -> PathBuf {
        let dir = self.path().join("devices").join(tree);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("numa_node"), format!("{numa}\n")).unwrap();
        let bdf = dir.file_name().unwrap().to_owned();
        let bus = self.path().join("bus/pci/devices");
        fs::create_dir_all(&bus).unwrap();
        symlink(format!("../../../devices/{tree}"), bus.join(&bdf)).unwrap();
        dir
    }

    fn gpu(&self, tree: &str, numa: i32) {
        self.pci(tree, numa);
    }

    /// An RDMA NIC on the PCI device at `tree`.
    fn nic(&self, name: &str, tree: &str, numa: i32) {
        let dev = self.pci(tree, numa);
        let ib = dev.join("infiniband").join(name);
        fs::create_dir_all(&ib).unwrap();
        symlink("../../../".to_string() + dev.file_name().unwrap().to_str().unwrap(), ib.join("device")).unwrap();
        let class = self.path().join("class/infiniband");
        fs::create_dir_all(&class).unwrap();
        symlink(format!("../../devices/{tree}/infiniband/{name}"), class.join(name)).unwrap();
    }

    /// A software RDMA device with no PCI function (soft RoCE).
    fn virtual_nic(&self, name: &str) {
        let dir = self.path().join("devices/virtual/infiniband").join(name);
        fs::create_dir_all(&dir).unwrap();
        let class = self.path().join("class/infiniband");
        fs::create_dir_all(&class).unwrap();
        symlink(format!("../../devices/virtual/infiniband/{name}"), class.join(name)).unwrap();
    }
}

fn two_socket_tree() -> Sysfs {
    let s = Sysfs::new();
    // Socket 0: a PCIe switch below root port 00:01.0 holds GPU 03:00.0 and two NICs, one of them
    // behind a further bridge; another root port of the same host bridge holds mlx5_2; a second
    // host bridge of the same node holds mlx5_3.
    s.gpu("pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:00.0/0000:03:00.0", 0);
    s.nic("mlx5_0", "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:04:00.0", 0);
    s.nic("mlx5_1", "pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:02.0/0000:05:00.0/0000:06:00.0", 0);
    s.nic("mlx5_2", "pci0000:00/0000:00:03.0/0000:07:00.0", 0);
    s.nic("mlx5_3", "pci0000:40/0000:40:01.0/0000:41:00.0", 0);
    // Socket 1: GPU 81:00.0 and mlx5_4 on different root ports of one host bridge.
    s.gpu("pci0000:80/0000:80:01.0/0000:81:00.0", 1);
    s.nic("mlx5_4", "pci0000:80/0000:80:02.0/0000:82:00.0", 1);
    s.virtual_nic("rxe0");
    s
}

#[test]
fn nics_are_ranked_by_pcie_relation_from_sysfs() {
    let s = two_socket_tree();
    // CUDA ordinals need not follow PCI order: GPUs are matched by address.
    let gpus = [
        GpuPci { ordinal: 1, pci_bus_id: "0000:03:00.0".into() },
        GpuPci { ordinal: 0, pci_bus_id: "00000000:81:00.0".into() },
    ];
    let ranked = rank_nics(&gpus, s.path()).unwrap();
    let first: Vec<(&str, PciRelation)> = ranked[0].1.iter().map(|n| (n.name.as_str(), n.relation)).collect();
    assert_eq!(
        first,
        [
            ("mlx5_0", PciRelation::SameSwitch),
            ("mlx5_1", PciRelation::SameSwitch),
            ("mlx5_2", PciRelation::SameRootComplex),
            ("mlx5_3", PciRelation::SameNumaNode),
            ("mlx5_4", PciRelation::Other),
            ("rxe0", PciRelation::Other),
        ]
    );
    assert!(ranked[0].1[0].hops < ranked[0].1[1].hops, "the NIC behind one more bridge ranks second");

    let a = nic_affinity(&gpus, s.path()).unwrap();
    assert_eq!(
        a,
        json!({
            "cuda:1": [["mlx5_0"], ["mlx5_1", "mlx5_2", "mlx5_3", "mlx5_4", "rxe0"]],
            "cuda:0": [["mlx5_4"], ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3", "rxe0"]],
        })
    );
    assert_eq!(pci_numa_node(s.path(), "0000:81:00.0"), Some(1));
    assert_eq!(pci_numa_node(s.path(), "0000:99:00.0"), None);
}

#[test]
fn no_rdma_nics_gives_empty_lists_and_a_missing_gpu_an_error() {
    let s = Sysfs::new();
    s.gpu("pci0000:00/0000:00:01.0/0000:01:00.0", -1);
    let gpus = [GpuPci { ordinal: 0, pci_bus_id: "0000:01:00.0".into() }];
    assert_eq!(nic_affinity(&gpus, s.path()).unwrap(), json!({"cuda:0": [[], []]}));
    let missing = [GpuPci { ordinal: 3, pci_bus_id: "0000:09:00.0".into() }];
    let e = nic_affinity(&missing, s.path()).unwrap_err();
    assert!(e.to_string().contains("0000:09:00.0"), "{e}");
}
