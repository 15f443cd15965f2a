//! Tests that need an NVIDIA GPU. Each starts by probing and returns early, printing
//! "no CUDA device: skipped", where CUDA is unusable (as on machines without a driver).
//!
//! Sharing between processes re-runs this test binary as a child (`child_import`, driven by the
//! `MC_CUDA_TEST_CHILD` environment variable), since CUDA IPC handles cannot be opened by the
//! process that exported them.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use mooncake_core::{AllocOptions, Allocation, Error, Location, MemoryDevice, MemoryKind, SharingHandle};
use mooncake_device_cuda::topology::GpuTopology;
use mooncake_device_cuda::{
    AllocationKind, CUDA_IPC_HANDLE_KIND, CUDA_POSIX_FD_HANDLE_KIND, CudaDevice, STAGING_CHUNK, STAGING_DIRECT_MAX,
    probe,
};

const CHILD_ENV: &str = "MC_CUDA_TEST_CHILD";

fn device() -> Option<CudaDevice> {
    if !probe().is_available() {
        println!("no CUDA device: skipped");
        return None;
    }
    Some(CudaDevice::new().expect("probe passed"))
}

fn on(ordinal: u32, shareable: bool) -> AllocOptions {
    AllocOptions { location: Location::Device(MemoryKind::Cuda, ordinal), shareable, ..Default::default() }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 12) as u8).collect()
}

fn cuda(n: u32) -> Location {
    Location::Device(MemoryKind::Cuda, n)
}

#[test]
fn allocate_classify_and_copy_both_ways() {
    let Some(dev) = device() else { return };
    let sizes = [1usize, 4096, STAGING_DIRECT_MAX + 1, 3 * STAGING_CHUNK + 5];
    for shareable in [false, true] {
        for &len in &sizes {
            let a = dev.allocate(len as u64 + 64, &on(0, shareable)).unwrap();
            assert_eq!(a.location, cuda(0));
            assert_eq!(dev.classify(a.addr, a.len), Some(cuda(0)));
            assert_eq!(dev.classify(a.addr + 1, 1), Some(cuda(0)));
            assert_eq!(dev.classify(a.addr, 1 << 40), None, "crosses the end of the allocation");
            assert_eq!(dev.allocation_of(a.addr + 8, 8), Some(a.clone()));
            let src = pattern(len, len as u8);
            dev.copy_from_host(&src, &a, 64).unwrap();
            let mut back = vec![0u8; len];
            dev.copy_to_host(&a, 64, &mut back).unwrap();
            assert!(back == src, "round trip of {len} bytes (shareable {shareable})");
            let mut one = [0u8; 1];
            assert!(matches!(dev.copy_to_host(&a, a.len, &mut one), Err(Error::AddressNotRegistered { .. })));
            dev.free(&a).unwrap();
        }
    }
    let host = vec![0u8; 4096];
    assert_eq!(dev.classify(host.as_ptr() as u64, 4096), None, "host memory is the host device's");
    assert_eq!(dev.live_allocations(), 0);
}

#[test]
fn shareable_memory_uses_vmm_where_supported() {
    let Some(dev) = device() else { return };
    let a = dev.allocate(1000, &on(0, true)).unwrap();
    let kind = dev.allocation_kind(&a).unwrap();
    if dev.device_info(0).unwrap().vmm {
        assert!(matches!(kind, AllocationKind::Vmm { .. }), "{kind:?}");
    } else {
        assert_eq!(kind, AllocationKind::MemAlloc);
    }
    let aligned = dev.allocate(4096, &AllocOptions { alignment: 1 << 21, ..on(0, false) });
    if dev.device_info(0).unwrap().vmm {
        assert_eq!(aligned.as_ref().unwrap().addr % (1 << 21), 0);
        dev.free(&aligned.unwrap()).unwrap();
    }
    dev.free(&a).unwrap();
}

#[test]
fn copy_between_same_device_and_peers() {
    let Some(dev) = device() else { return };
    let len = 3 << 20;
    let src = pattern(len, 9);
    let a = dev.allocate(len as u64, &on(0, false)).unwrap();
    let b = dev.allocate(len as u64, &on(0, true)).unwrap();
    dev.copy_from_host(&src, &a, 0).unwrap();
    dev.copy_between(&a, 100, &b, 200, (len - 300) as u64).unwrap();
    let mut back = vec![0u8; len - 300];
    dev.copy_to_host(&b, 200, &mut back).unwrap();
    assert!(back[..] == src[100..len - 200]);
    assert!(matches!(dev.copy_between(&a, 0, &a, 10, 100), Err(Error::InvalidArgument(_))), "overlap");
    assert!(matches!(dev.copy_between(&a, 1, &b, 0, len as u64), Err(Error::AddressNotRegistered { .. })));
    if dev.device_count() > 1 {
        let c = dev.allocate(len as u64, &on(1, false)).unwrap();
        dev.copy_between(&a, 0, &c, 0, len as u64).unwrap();
        let mut back = vec![0u8; len];
        dev.copy_to_host(&c, 0, &mut back).unwrap();
        assert!(back == src);
        dev.free(&c).unwrap();
    } else {
        println!("one GPU: cross-device copy_between skipped");
    }
    dev.free(&a).unwrap();
    dev.free(&b).unwrap();
}

#[test]
fn freed_and_foreign_buffers_are_typed_errors() {
    let Some(dev) = device() else { return };
    let a = dev.allocate(1 << 20, &on(0, false)).unwrap();
    dev.free(&a).unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(dev.copy_to_host(&a, 0, &mut buf), Err(Error::NotFound(_))));
    assert!(matches!(dev.free(&a), Err(Error::NotFound(_))), "double free");
    let mut stale = a.clone();
    stale.token += 1;
    assert!(matches!(dev.free(&stale), Err(Error::NotFound(_))));

    // Memory another allocator owns (here: a second device instance, as PyTorch would be).
    let other = CudaDevice::new().unwrap();
    let b = other.allocate(1 << 20, &on(0, false)).unwrap();
    let foreign = dev.allocation_of(b.addr + 4096, 16).expect("device memory is described");
    assert_eq!(foreign.token, 0);
    assert_eq!(foreign.addr, b.addr);
    assert!(foreign.len >= b.len);
    dev.copy_from_host(b"foreign", &foreign, 4096).unwrap();
    let mut out = [0u8; 7];
    other.copy_to_host(&b, 4096, &mut out).unwrap();
    assert_eq!(&out, b"foreign");
    assert!(matches!(dev.free(&foreign), Err(Error::NotFound(_))), "foreign memory is never freed here");
    other.free(&b).unwrap();
    let e = dev.copy_to_host(&foreign, 0, &mut out).unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "freed foreign buffer: {e}");
    let bogus = Allocation { addr: 0x10, len: 16, location: cuda(0), token: 0 };
    assert!(matches!(dev.copy_to_host(&bogus, 0, &mut out), Err(Error::NotFound(_))));
}

#[test]
fn hold_defers_the_free() {
    let Some(dev) = device() else { return };
    let a = dev.allocate(4096, &on(0, false)).unwrap();
    let held = dev.hold(&a).unwrap();
    assert_eq!((held.addr(), held.len()), (a.addr, a.len));
    dev.free(&a).unwrap();
    assert_eq!(dev.live_allocations(), 0);
    assert!(matches!(dev.hold(&a), Err(Error::NotFound(_))));
    // Still mapped while held: the driver still knows the allocation.
    assert_eq!(dev.classify(a.addr, a.len), Some(cuda(0)));
    drop(held);
}

#[test]
fn bad_locations_are_refused() {
    let Some(dev) = device() else { return };
    let n = dev.device_count();
    let e = dev.allocate(4096, &on(n, false)).unwrap_err();
    assert!(
        matches!(&e, Error::DeviceNotFound(m) if m.contains(&format!("cuda:{n}")) && m.contains(&n.to_string())),
        "{e}"
    );
    let cpu = AllocOptions { location: Location::Cpu(Some(0)), ..Default::default() };
    assert!(matches!(dev.allocate(4096, &cpu), Err(Error::InvalidArgument(_))));
    assert!(matches!(dev.allocate(0, &on(0, false)), Err(Error::InvalidArgument(_))));
    assert!(matches!(
        dev.allocate(4096, &AllocOptions { alignment: 3, ..on(0, false) }),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn pci_addresses_dmabuf_and_topology() {
    let Some(dev) = device() else { return };
    let pci = dev.pci_address(&cuda(0)).unwrap();
    assert_eq!(mooncake_device_cuda::topology::normalize_pci_bus_id(&pci).as_deref(), Some(pci.as_str()));
    assert_eq!(dev.pci_address(&cuda(dev.device_count())), None);
    assert_eq!(dev.pci_address(&Location::Cpu(Some(0))), None);

    let a = dev.allocate(1 << 21, &on(0, false)).unwrap();
    match dev.export_dmabuf(a.addr + 100, 5000) {
        Ok(export) => {
            assert!(dev.device_info(0).unwrap().dmabuf);
            assert!(export.fd.as_raw_fd() >= 0);
            // SAFETY: sysconf has no memory-safety preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
            assert_eq!(export.offset, (a.addr + 100) % page);
        }
        Err(Error::Unsupported { .. }) => assert!(!dev.device_info(0).unwrap().dmabuf),
        Err(e) => panic!("export_dmabuf: {e}"),
    }
    assert!(dev.export_dmabuf(a.addr, 1 << 40).is_err());
    dev.free(&a).unwrap();

    let affinity = dev.nic_affinity(Path::new("/sys")).unwrap();
    assert!(affinity.get("cuda:0").is_some(), "{affinity}");
    match GpuTopology::from_nvml() {
        Ok(t) => {
            assert!(t.gpus.len() as u32 >= dev.device_count());
            assert!(t.by_pci(&pci).is_some(), "NVML knows cuda:0 at {pci}");
        }
        Err(e) => println!("NVML: {e}"),
    }
}

/// Runs this binary's `child_import` test with the handle in the environment.
fn run_child(handle: &SharingHandle, expect: &str) -> String {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "child_import", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, expect)
        .env("MC_CUDA_TEST_KIND", &handle.kind)
        .env("MC_CUDA_TEST_LEN", handle.len.to_string())
        .env("MC_CUDA_TEST_DATA", handle.data.iter().map(|b| format!("{b:02x}")).collect::<String>());
    // The child inherits a duplicate of the fd (dup clears close-on-exec).
    let dup = handle.fd.as_ref().map(|fd| {
        // SAFETY: dup of a descriptor the handle keeps open; the result is owned below.
        let raw = unsafe { libc::dup(fd.as_raw_fd()) };
        assert!(raw >= 0, "dup failed");
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        unsafe { OwnedFd::from_raw_fd(raw) }
    });
    if let Some(fd) = &dup {
        cmd.env("MC_CUDA_TEST_FD", fd.as_raw_fd().to_string());
    }
    let out = cmd.output().unwrap();
    drop(dup);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("child ok"), "child did not run:\n{text}");
    text
}

/// The child side of the sharing tests (does nothing unless run by `run_child`).
#[test]
fn child_import() {
    let Ok(expect) = std::env::var(CHILD_ENV) else { return };
    let dev = CudaDevice::new().unwrap();
    let var = |k: &str| std::env::var(k).unwrap();
    let data: Vec<u8> = (0..var("MC_CUDA_TEST_DATA").len() / 2)
        .map(|i| u8::from_str_radix(&var("MC_CUDA_TEST_DATA")[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let fd = std::env::var("MC_CUDA_TEST_FD").ok().map(|s| {
        // SAFETY: the parent passed this inherited descriptor for us to own.
        Arc::new(unsafe { OwnedFd::from_raw_fd(s.parse().unwrap()) })
    });
    let handle =
        SharingHandle { kind: var("MC_CUDA_TEST_KIND"), data, fd, len: var("MC_CUDA_TEST_LEN").parse().unwrap() };
    let imported = dev.import_handle(&handle);
    if expect == "gone" {
        let e = imported.expect_err("importing freed memory must fail");
        println!("import failed as expected: {e}");
        println!("child ok");
        return;
    }
    let a = imported.unwrap();
    assert!(dev.allocation_kind(&a).unwrap().is_imported());
    assert_eq!(a.len, handle.len);
    let mut head = [0u8; 6];
    dev.copy_to_host(&a, 0, &mut head).unwrap();
    assert_eq!(&head, b"parent");
    dev.copy_from_host(b"child!", &a, 6).unwrap();
    assert!(matches!(dev.export_handle(&a), Err(Error::Unsupported { .. })));
    dev.free(&a).unwrap();
    assert!(matches!(dev.free(&a), Err(Error::NotFound(_))));
    println!("child ok");
}

fn share_with_child(dev: &CudaDevice, shareable: bool) {
    let a = dev.allocate(1 << 20, &on(0, shareable)).unwrap();
    dev.copy_from_host(b"parent", &a, 0).unwrap();
    let h = dev.export_handle(&a).unwrap();
    assert_eq!(h.len, a.len);
    match dev.allocation_kind(&a).unwrap() {
        AllocationKind::MemAlloc => assert_eq!((h.kind.as_str(), h.data.len()), (CUDA_IPC_HANDLE_KIND, 64)),
        AllocationKind::Vmm { fabric: false } => {
            assert_eq!(h.kind, CUDA_POSIX_FD_HANDLE_KIND);
            assert!(h.fd.is_some() && h.data.is_empty());
        }
        other => println!("shared as {} ({other:?})", h.kind),
    }
    run_child(&h, "ok");
    let mut back = [0u8; 12];
    dev.copy_to_host(&a, 0, &mut back).unwrap();
    assert_eq!(&back, b"parentchild!", "the child's write landed in our memory");
    dev.free(&a).unwrap();
}

#[test]
fn export_and_import_in_a_child_process() {
    let Some(dev) = device() else { return };
    share_with_child(&dev, false);
    if dev.device_info(0).unwrap().vmm {
        share_with_child(&dev, true);
    } else {
        println!("no VMM on cuda:0: fd sharing skipped");
    }
}

#[test]
fn a_handle_of_freed_memory_fails_to_import() {
    let Some(dev) = device() else { return };
    let a = dev.allocate(1 << 20, &on(0, false)).unwrap();
    let h = dev.export_handle(&a).unwrap();
    dev.free(&a).unwrap();
    run_child(&h, "gone");
    // Malformed handles never reach the driver.
    let bad = SharingHandle { kind: CUDA_IPC_HANDLE_KIND.into(), data: vec![0; 10], fd: None, len: 4096 };
    assert!(matches!(dev.import_handle(&bad), Err(Error::InvalidArgument(_))));
}
