//! The MUSA device on a real runtime and GPU. Every test returns early with "no MUSA device: skipped" where
//! [`probe`] fails (no `libmusart.so`, or no device), so the suite passes on machines without one.

use std::process::Command;

use mooncake_core::registry::Availability;
use mooncake_core::{AllocOptions, Allocation, Error, Location, MemoryDevice, MemoryKind, SharingHandle};
use mooncake_device_musa::{MUSA_IPC_HANDLE_KIND, MusaDevice, probe};

/// Set in the child process of [`ipc_handles_open_in_another_process`]: `HEXHANDLE:LEN`.
const CHILD_ENV: &str = "MOONCAKE_MUSA_IPC_CHILD";

fn device() -> Option<MusaDevice> {
    match probe() {
        Availability::Available => Some(MusaDevice::new().expect("probe passed, so the device must open")),
        Availability::Unavailable(why) => {
            println!("no MUSA device: skipped ({why})");
            None
        }
    }
}

fn musa(n: u32) -> Location {
    Location::Device(MemoryKind::Musa, n)
}

fn at(n: u32) -> AllocOptions {
    AllocOptions { location: musa(n), ..Default::default() }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

#[test]
fn allocates_classifies_and_copies() {
    let Some(dev) = device() else { return };
    println!("runtime {:?}, {} device(s)", dev.runtime_version(), dev.device_count());
    const LEN: usize = 4 << 20;
    let a = dev.allocate(LEN as u64, &at(0)).unwrap();
    assert_eq!(a.location, musa(0));
    assert_eq!(dev.classify(a.addr, a.len), Some(musa(0)));
    assert_eq!(dev.classify(a.addr + 4096, 4096), Some(musa(0)));
    assert_eq!(dev.classify(a.addr, a.len + (64 << 20)), None, "past the allocation");
    let host = vec![0u8; 4096];
    assert_eq!(dev.classify(host.as_ptr() as u64, 4096), None, "host memory");
    let data = pattern(1, LEN);
    dev.copy_from_host(&data, &a, 0).unwrap();
    let mut back = vec![0u8; LEN];
    dev.copy_to_host(&a, 0, &mut back).unwrap();
    assert!(back == data, "round trip through the GPU");
    let mut part = vec![0u8; 1000];
    dev.copy_to_host(&a, 12345, &mut part).unwrap();
    assert_eq!(part, data[12345..13345]);
    assert!(matches!(dev.copy_to_host(&a, LEN as u64 - 10, &mut part), Err(Error::AddressNotRegistered { .. })));
    let pci = dev.pci_address(&musa(0)).expect("a PCI address for musa:0");
    assert_eq!(pci, pci.to_lowercase());
    assert_eq!(pci.matches(':').count(), 2, "{pci}");
    let default = dev.allocate(4096, &AllocOptions::default()).unwrap();
    assert!(matches!(default.location, Location::Device(MemoryKind::Musa, _)));
    dev.free(&default).unwrap();
    dev.free(&a).unwrap();
}

#[test]
fn bad_ordinals_and_locations_are_typed_errors() {
    let Some(dev) = device() else { return };
    let n = dev.device_count();
    assert!(matches!(dev.allocate(4096, &at(n)), Err(Error::DeviceNotFound(_))));
    let host = AllocOptions { location: Location::Cpu(Some(0)), ..Default::default() };
    assert!(matches!(dev.allocate(4096, &host), Err(Error::InvalidArgument(_))));
    assert_eq!(dev.pci_address(&musa(n)), None);
}

#[test]
fn copies_between_allocations() {
    let Some(dev) = device() else { return };
    const LEN: usize = 1 << 20;
    let a = dev.allocate(LEN as u64, &at(0)).unwrap();
    let b = dev.allocate(LEN as u64, &at(0)).unwrap();
    let data = pattern(2, LEN);
    dev.copy_from_host(&data, &a, 0).unwrap();
    dev.copy_between(&a, 100, &b, 200, 50_000).unwrap();
    let mut out = vec![0u8; 50_000];
    dev.copy_to_host(&b, 200, &mut out).unwrap();
    assert!(out == data[100..50_100], "same-device copy");
    if dev.device_count() >= 2 {
        let c = dev.allocate(LEN as u64, &at(1)).unwrap();
        dev.copy_between(&a, 0, &c, 0, LEN as u64).unwrap();
        let mut all = vec![0u8; LEN];
        dev.copy_to_host(&c, 0, &mut all).unwrap();
        assert!(all == data, "peer copy");
        dev.free(&c).unwrap();
    } else {
        println!("one MUSA device: peer copy skipped");
    }
    dev.free(&b).unwrap();
    assert!(matches!(dev.copy_between(&a, 0, &b, 0, 16), Err(Error::NotFound(_))));
    dev.free(&a).unwrap();
}

#[test]
fn freed_buffers_are_errors_not_crashes() {
    let Some(dev) = device() else { return };
    let a = dev.allocate(1 << 20, &at(0)).unwrap();
    dev.free(&a).unwrap();
    let mut out = [0u8; 16];
    assert!(matches!(dev.copy_to_host(&a, 0, &mut out), Err(Error::NotFound(_))));
    assert!(matches!(dev.copy_from_host(&out, &a, 0), Err(Error::NotFound(_))));
    assert!(matches!(dev.free(&a), Err(Error::NotFound(_))));

    // Memory another allocator owns (here a second device instance), found by address.
    let other = MusaDevice::new().unwrap();
    let b = other.allocate(1 << 20, &at(0)).unwrap();
    other.copy_from_host(b"owned elsewhere", &b, 64).unwrap();
    let Some(found) = dev.allocation_of(b.addr + 64, 15) else {
        println!("no muMemGetAddressRange_v2 (libmusa.so): foreign part skipped");
        other.free(&b).unwrap();
        return;
    };
    assert_eq!((found.addr, found.token), (b.addr, 0));
    assert!(found.len >= b.len);
    let mut text = [0u8; 15];
    dev.copy_to_host(&found, 64, &mut text).unwrap();
    assert_eq!(&text, b"owned elsewhere");
    other.free(&b).unwrap();
    let r = dev.copy_to_host(&found, 64, &mut text);
    assert!(matches!(r, Err(Error::NotFound(_))), "foreign memory freed by its owner: {r:?}");
    assert_eq!(dev.classify(b.addr, 16), None);
}

#[test]
fn ipc_handles_open_in_another_process() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return child(&spec);
    }
    let Some(dev) = device() else { return };
    const LEN: usize = 2 << 20;
    let a = dev.allocate(LEN as u64, &at(0)).unwrap();
    dev.copy_from_host(&pattern(5, LEN), &a, 0).unwrap();
    let h = dev.export_handle(&a).unwrap();
    assert_eq!((h.kind.as_str(), h.data.len(), h.len), (MUSA_IPC_HANDLE_KIND, 64, LEN as u64));
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args(["ipc_handles_open_in_another_process", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{}:{}", hex(&h.data), h.len))
        .output()
        .unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "child failed:\n{log}");
    assert!(log.contains("child imported and wrote"), "the child did not run the import:\n{log}");
    let mut reply = vec![0u8; 4096];
    dev.copy_to_host(&a, 8192, &mut reply).unwrap();
    assert!(reply == pattern(9, 4096), "the child's write reached the exporter's memory");
    dev.free(&a).unwrap();
}

/// The importing side: checks the exporter's bytes and writes a reply at offset 8192.
fn child(spec: &str) {
    let (data, len) = spec.split_once(':').expect("HEX:LEN");
    let len: u64 = len.parse().unwrap();
    let dev = MusaDevice::new().expect("the child sees the MUSA device");
    let h = SharingHandle { kind: MUSA_IPC_HANDLE_KIND.into(), data: unhex(data), fd: None, len };
    let b: Allocation = dev.import_handle(&h).unwrap();
    assert_eq!(b.len, len);
    let mut got = vec![0u8; len as usize];
    dev.copy_to_host(&b, 0, &mut got).unwrap();
    assert!(got == pattern(5, len as usize), "the child sees the exporter's bytes");
    dev.copy_from_host(&pattern(9, 4096), &b, 8192).unwrap();
    assert!(matches!(dev.export_handle(&b), Err(Error::InvalidArgument(_))));
    dev.free(&b).unwrap();
    assert!(matches!(dev.free(&b), Err(Error::NotFound(_))));
    println!("child imported and wrote");
}
