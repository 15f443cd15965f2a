//! Topology discovery against the sysfs fixture trees in `tests/fixtures`.

use std::path::PathBuf;

use mooncake_transport_rdma::topology::{PciDevice, Topology};
use serde_json::{Value, json};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn two_numa_box_with_switches() {
    let topo = Topology::discover(&fixture("two_numa"), &[]);
    assert_eq!(topo.nics.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["mlx5_0", "mlx5_1", "mlx5_2"]);
    let mlx5_0 = topo.nics[0].pci.as_ref().unwrap();
    assert_eq!(
        mlx5_0,
        &PciDevice {
            addr: "0000:04:00.0".into(),
            path: names(&["pci0000:00", "0000:00:01.0", "0000:01:00.0", "0000:02:01.0", "0000:04:00.0"]),
            numa_node: Some(0),
        }
    );
    let gpus: Vec<(&str, &str)> = topo.gpus.iter().map(|g| (g.location.as_str(), g.pci.addr.as_str())).collect();
    assert_eq!(gpus, [("cuda:0", "0000:03:00.0"), ("cuda:1", "0000:83:00.0"), ("hip:0", "0000:07:00.0")]);
    assert_eq!(topo.numa_nodes[&0], vec![0, 1, 2, 3, 8, 9, 10, 11]);
    assert_eq!(topo.numa_nodes[&1], vec![4, 5, 6, 7, 12, 13, 14, 15]);
    assert_eq!(topo.cpus_near("mlx5_1"), vec![4, 5, 6, 7, 12, 13, 14, 15]);

    let matrix = topo.priority_matrix(&names(&["mlx5_0", "mlx5_1", "mlx5_2"]));
    let expected: Value = json!({
        "cpu:0":  [["mlx5_0", "mlx5_2"], ["mlx5_1"]],
        "cpu:1":  [["mlx5_1"], ["mlx5_0", "mlx5_2"]],
        "cuda:0": [["mlx5_0"], ["mlx5_1", "mlx5_2"]],
        "cuda:1": [["mlx5_1"], ["mlx5_0", "mlx5_2"]],
        "hip:0":  [["mlx5_0", "mlx5_2"], ["mlx5_1"]]
    });
    assert_eq!(matrix.to_json(), expected);
    // Upstream's resolution order, which is also the published `devices` order.
    assert_eq!(matrix.device_order(), names(&["mlx5_0", "mlx5_2", "mlx5_1"]));
}

#[test]
fn nic_filter_restricts_the_matrix() {
    let filter = names(&["mlx5_1", "mlx5_2"]);
    let topo = Topology::discover(&fixture("two_numa"), &filter);
    assert_eq!(topo.nics.len(), 2);
    let matrix = topo.priority_matrix(&filter);
    let expected: Value = json!({
        "cpu:0":  [["mlx5_2"], ["mlx5_1"]],
        "cpu:1":  [["mlx5_1"], ["mlx5_2"]],
        // No NIC left behind cuda:0's switch: NUMA-local NICs are preferred instead.
        "cuda:0": [["mlx5_2"], ["mlx5_1"]],
        "cuda:1": [["mlx5_1"], ["mlx5_2"]],
        "hip:0":  [["mlx5_2"], ["mlx5_1"]]
    });
    assert_eq!(matrix.to_json(), expected);
}

#[test]
fn usable_nics_unknown_to_sysfs_are_fallbacks() {
    let topo = Topology::discover(&fixture("two_numa"), &[]);
    // mlx5_1 is not usable (e.g. port down); rxe0 is usable but has no sysfs entry.
    let matrix = topo.priority_matrix(&names(&["mlx5_0", "mlx5_2", "rxe0"]));
    assert_eq!(matrix.entries["cpu:1"].preferred, Vec::<String>::new());
    assert_eq!(matrix.entries["cpu:1"].fallback, names(&["mlx5_0", "mlx5_2", "rxe0"]));
    assert_eq!(matrix.entries["cuda:1"].preferred, Vec::<String>::new(), "no NIC on GPU 1's node");
    assert_eq!(matrix.entries["cpu:0"].fallback, names(&["rxe0"]));
}

#[test]
fn single_node_vm_without_gpus() {
    let topo = Topology::discover(&fixture("no_gpu"), &[]);
    assert!(topo.gpus.is_empty(), "emulated VGA is not a GPU");
    assert_eq!(topo.nics.iter().map(|n| n.pci.as_ref().unwrap().numa_node).collect::<Vec<_>>(), [None, None]);
    let matrix = topo.priority_matrix(&names(&["mlx5_0", "mlx5_1"]));
    // numa_node -1 on a single-node machine counts as node 0.
    assert_eq!(matrix.to_json(), json!({"cpu:0": [["mlx5_0", "mlx5_1"], []]}));
}

#[test]
fn missing_sysfs_means_no_devices_and_one_node() {
    let topo = Topology::discover(&fixture("does-not-exist"), &[]);
    assert!(topo.nics.is_empty() && topo.gpus.is_empty());
    assert_eq!(topo.numa_nodes.keys().copied().collect::<Vec<_>>(), [0]);
    assert_eq!(topo.priority_matrix(&[]).to_json(), json!({"cpu:0": [[], []]}));
    assert_eq!(topo.priority_matrix(&names(&["mlx5_0"])).to_json(), json!({"cpu:0": [[], ["mlx5_0"]]}));
}

/// CUDA numbers GPUs its own way (fastest first, `CUDA_VISIBLE_DEVICES`): the matrix follows the driver's
/// ordinals, not the PCI order, and a GPU hidden from this process is left out.
#[test]
fn gpus_take_the_drivers_ordinals() {
    let topo = Topology::discover(&fixture("two_numa"), &[]);
    let swapped = topo
        .clone()
        .with_driver_ordinals(&[("cuda:0".into(), "0000:83:00.0".into()), ("cuda:1".into(), "0000:03:00.0".into())]);
    let gpus: Vec<(&str, &str)> = swapped.gpus.iter().map(|g| (g.location.as_str(), g.pci.addr.as_str())).collect();
    assert_eq!(gpus, [("cuda:1", "0000:03:00.0"), ("cuda:0", "0000:83:00.0"), ("hip:0", "0000:07:00.0")]);
    let matrix = swapped.priority_matrix(&names(&["mlx5_0", "mlx5_1", "mlx5_2"])).to_json();
    assert_eq!(matrix["cuda:0"], json!([["mlx5_1"], ["mlx5_0", "mlx5_2"]]));
    assert_eq!(matrix["cuda:1"], json!([["mlx5_0"], ["mlx5_1", "mlx5_2"]]));

    let hidden = topo.clone().with_driver_ordinals(&[("cuda:0".into(), "0000:83:00.0".into())]);
    assert_eq!(hidden.gpus.iter().map(|g| g.location.as_str()).collect::<Vec<_>>(), ["cuda:0", "hip:0"]);
    assert_eq!(topo.clone().with_driver_ordinals(&[]), topo, "no driver reports: PCI order stays");
}
