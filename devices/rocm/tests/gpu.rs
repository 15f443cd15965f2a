//! Tests on a real AMD GPU. Each returns early with "no AMD GPU: skipped" where [`probe`] fails, so they
//! pass (doing nothing) on machines without ROCm.
//!
//! Export and import across processes: the test re-runs this test binary as a child, naming itself with
//! `--exact` and passing the handle in [`CHILD_ENV`] (and, for a file descriptor handle, the descriptor by
//! inheritance); the child imports, checks and overwrites the bytes, and the parent reads the change back.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;

use mooncake_core::{AllocOptions, Allocation, Error, Location, MemoryDevice, MemoryKind, SharingHandle};
use mooncake_device_rocm::{
    HIP_IPC_HANDLE_KIND, HIP_POSIX_FD_HANDLE_KIND, RocmDevice, SharingMode, probe, validate_handle,
};

/// Set in a child process: `kind;len;hex data;fd;expect` of the handle to import (`expect`: `live`, or
/// `gone` for a handle of memory the parent has freed).
const CHILD_ENV: &str = "MC_ROCM_TEST_CHILD";

fn gpu(mode: SharingMode) -> Option<RocmDevice> {
    if !probe().is_available() {
        eprintln!("no AMD GPU: skipped ({:?})", probe());
        return None;
    }
    Some(RocmDevice::with_sharing(mode).expect("probe passed, so the device opens"))
}

fn on(n: u32) -> AllocOptions {
    AllocOptions { location: Location::Device(MemoryKind::Rocm, n), ..Default::default() }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn allocate_classify_copy_free() {
    let Some(dev) = gpu(SharingMode::Ipc) else { return };
    assert_eq!(dev.name(), "rocm");
    assert!(!dev.capabilities().host_accessible);
    let a = dev.allocate(3 << 20, &on(0)).unwrap();
    assert_eq!(a.location, Location::Device(MemoryKind::Rocm, 0));
    assert_eq!(a.location.to_string(), "hip:0");
    assert_eq!(dev.classify(a.addr + 100, 1000), Some(a.location.clone()));
    assert_eq!(dev.classify(a.addr, a.len + 1), None, "runs past the allocation");
    assert_eq!(dev.allocation_of(a.addr + 4096, 16), Some(a.clone()));
    let host = vec![0u8; 4096];
    assert_eq!(dev.classify(host.as_ptr() as u64, 4096), None, "host memory is not the GPU's");

    let data = pattern(1 << 20, 7);
    dev.copy_from_host(&data, &a, 12345).unwrap();
    let mut back = vec![0u8; data.len()];
    dev.copy_to_host(&a, 12345, &mut back).unwrap();
    assert_eq!(back, data);
    dev.copy_to_host(&a, 0, &mut []).unwrap();
    assert!(matches!(dev.copy_to_host(&a, a.len - 1, &mut [0; 2]), Err(Error::AddressNotRegistered { .. })));

    let pci = dev.pci_address(&a.location).expect("a GPU has a PCI address");
    assert_eq!(pci, pci.to_ascii_lowercase());
    assert!(pci.contains(':'), "{pci}");

    dev.free(&a).unwrap();
    assert!(matches!(dev.free(&a), Err(Error::NotFound(_))), "double free");
    assert!(matches!(dev.copy_to_host(&a, 0, &mut [0; 4]), Err(Error::NotFound(_))), "use after free");
    assert_eq!(dev.live_allocations(), 0);
}

#[test]
fn copy_between_on_one_gpu_and_across_two() {
    let Some(dev) = gpu(SharingMode::Ipc) else { return };
    let len = 1 << 20;
    let a = dev.allocate(len, &on(0)).unwrap();
    let b = dev.allocate(len, &on(0)).unwrap();
    let data = pattern(len as usize, 3);
    dev.copy_from_host(&data, &a, 0).unwrap();
    dev.copy_between(&a, 4096, &b, 0, len - 4096).unwrap();
    let mut back = vec![0u8; (len - 4096) as usize];
    dev.copy_to_host(&b, 0, &mut back).unwrap();
    assert_eq!(back, data[4096..]);
    assert!(matches!(dev.copy_between(&a, 0, &a, 16, 64), Err(Error::InvalidArgument(_))), "overlap");
    assert!(matches!(dev.copy_between(&a, 1, &b, 0, len), Err(Error::AddressNotRegistered { .. })));
    if dev.device_count() > 1 {
        let c = dev.allocate(len, &on(1)).unwrap();
        dev.copy_between(&a, 0, &c, 0, len).unwrap();
        let mut back = vec![0u8; len as usize];
        dev.copy_to_host(&c, 0, &mut back).unwrap();
        assert_eq!(back, data);
        dev.free(&c).unwrap();
    } else {
        eprintln!("one AMD GPU: hipMemcpyPeer not exercised");
    }
    dev.free(&a).unwrap();
    dev.free(&b).unwrap();
}

#[test]
fn bad_ordinals_and_locations_are_typed_errors() {
    let Some(dev) = gpu(SharingMode::Ipc) else { return };
    let n = dev.device_count();
    assert!(matches!(dev.allocate(4096, &on(n)), Err(Error::DeviceNotFound(_))));
    assert_eq!(dev.pci_address(&Location::Device(MemoryKind::Rocm, n)), None);
    assert_eq!(dev.pci_address(&Location::Cpu(Some(0))), None);
    let cpu = AllocOptions { location: Location::Cpu(Some(0)), ..Default::default() };
    assert!(matches!(dev.allocate(4096, &cpu), Err(Error::InvalidArgument(_))));
    assert!(matches!(dev.allocate(0, &on(0)), Err(Error::InvalidArgument(_))));
    let odd = AllocOptions { alignment: 3, ..on(0) };
    assert!(matches!(dev.allocate(4096, &odd), Err(Error::InvalidArgument(_))));
}

#[test]
fn foreign_memory_freed_behind_the_device_is_an_error() {
    let Some(owner) = gpu(SharingMode::Ipc) else { return };
    let other = RocmDevice::with_sharing(SharingMode::Ipc).unwrap();
    let a = owner.allocate(2 << 20, &on(0)).unwrap();
    owner.copy_from_host(b"foreign", &a, 8).unwrap();
    // `other` did not allocate it: the runtime's tables give the allocation, with token 0.
    let f = other.allocation_of(a.addr + 8, 7).expect("GPU memory of this process");
    assert_eq!((f.addr, f.token), (a.addr, 0));
    assert!(f.len >= a.len);
    let mut out = [0u8; 7];
    other.copy_to_host(&f, 8, &mut out).unwrap();
    assert_eq!(&out, b"foreign");
    assert!(matches!(other.free(&f), Err(Error::NotFound(_))), "not its to free");
    assert!(matches!(other.hold(&f), Err(Error::Unsupported { .. })));
    owner.free(&a).unwrap();
    let err = other.copy_to_host(&f, 8, &mut out).unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    let err = other.copy_from_host(b"x", &f, 0).unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
}

#[test]
fn a_hold_outlives_free() {
    let Some(dev) = gpu(SharingMode::Ipc) else { return };
    let a = dev.allocate(1 << 20, &on(0)).unwrap();
    let held = dev.hold(&a).unwrap();
    assert_eq!((held.addr(), held.len()), (a.addr, a.len));
    dev.free(&a).unwrap();
    assert_eq!(dev.live_allocations(), 0);
    assert!(matches!(dev.hold(&a), Err(Error::NotFound(_))));
    // The memory is still allocated: the runtime still knows the address.
    assert!(dev.allocation_of(a.addr, 1).is_some(), "held memory is still live GPU memory");
    drop(held);
}

/// Runs this test again in a child process, importing `handle` there (`expect`: `live` or `gone`).
fn run_child(test: &str, handle: &SharingHandle, expect: &str) {
    let hex: String = handle.data.iter().map(|b| format!("{b:02x}")).collect();
    let fd = match &handle.fd {
        Some(fd) => {
            // SAFETY: F_SETFD on a descriptor this process owns only clears its close-on-exec flag, so the
            // child inherits it under the same number.
            let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) };
            assert_eq!(rc, 0, "fcntl: {}", std::io::Error::last_os_error());
            fd.as_raw_fd()
        }
        None => -1,
    };
    let spec = format!("{};{};{hex};{fd};{expect}", handle.kind, handle.len);
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, spec)
        .output()
        .unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "child failed:\n{log}");
    assert!(log.contains(&format!("child done: {expect}")), "the child did not run the import:\n{log}");
}

/// The child's side: import, check the parent's bytes, write new ones, unmap.
fn child(spec: &str) {
    let parts: Vec<&str> = spec.split(';').collect();
    let [kind, len, hex, fd, expect] = parts[..] else { panic!("bad {CHILD_ENV}: {spec}") };
    let data: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    let fd: i32 = fd.parse().unwrap();
    let fd = (fd >= 0).then(|| {
        // SAFETY: the parent cleared close-on-exec on this descriptor for this child, which owns its copy and
        // nothing else in this process uses that number.
        Arc::new(unsafe { OwnedFd::from_raw_fd(fd) })
    });
    let handle = SharingHandle { kind: kind.into(), data, fd, len: len.parse().unwrap() };
    validate_handle(&handle).unwrap();
    let dev = RocmDevice::new().unwrap();
    if expect == "gone" {
        let err = dev.import_handle(&handle).expect_err("the memory behind the handle was freed");
        println!("child done: gone ({err})");
        return;
    }
    let a = dev.import_handle(&handle).unwrap();
    assert_eq!(a.len, handle.len);
    assert_eq!(dev.classify(a.addr, a.len), Some(a.location.clone()));
    let mut got = vec![0u8; 4096];
    dev.copy_to_host(&a, 0, &mut got).unwrap();
    assert_eq!(got, pattern(4096, 1), "the child sees the parent's bytes");
    dev.copy_from_host(&pattern(4096, 2), &a, 0).unwrap();
    assert!(matches!(dev.export_handle(&a), Err(Error::Unsupported { .. })), "no re-export");
    dev.free(&a).unwrap();
    println!("child done: live ({kind} at {:#x})", a.addr);
}

fn share_with_a_child(test: &str, dev: &RocmDevice, a: &Allocation, kind: &str) {
    dev.copy_from_host(&pattern(4096, 1), a, 0).unwrap();
    let handle = dev.export_handle(a).unwrap();
    assert_eq!(handle.kind, kind);
    assert_eq!(handle.len, a.len);
    validate_handle(&handle).unwrap();
    run_child(test, &handle, "live");
    let mut got = vec![0u8; 4096];
    dev.copy_to_host(a, 0, &mut got).unwrap();
    assert_eq!(got, pattern(4096, 2), "the parent sees the child's bytes");
}

#[test]
fn ipc_handles_cross_processes() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return child(&spec);
    }
    let Some(dev) = gpu(SharingMode::Ipc) else { return };
    let a = dev.allocate(2 << 20, &AllocOptions { shareable: true, ..on(0) }).unwrap();
    share_with_a_child("ipc_handles_cross_processes", &dev, &a, HIP_IPC_HANDLE_KIND);
    let stale = dev.export_handle(&a).unwrap();
    assert_eq!(stale.data.len(), 64);
    dev.free(&a).unwrap();
    // A handle of freed memory fails to import with an error, not a crash.
    run_child("ipc_handles_cross_processes", &stale, "gone");
}

#[test]
fn posix_fd_handles_cross_processes() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return child(&spec);
    }
    let Some(dev) = gpu(SharingMode::PosixFd) else { return };
    if !dev.supports_vmm(0) {
        eprintln!("hip:0 lacks virtual memory management: skipped");
        return;
    }
    let a = dev.allocate(3 << 20, &AllocOptions { shareable: true, ..on(0) }).unwrap();
    share_with_a_child("posix_fd_handles_cross_processes", &dev, &a, HIP_POSIX_FD_HANDLE_KIND);
    dev.free(&a).unwrap();
    let unshareable = dev.allocate(1 << 20, &on(0)).unwrap();
    assert_eq!(dev.export_handle(&unshareable).unwrap().kind, HIP_IPC_HANDLE_KIND, "hipMalloc memory shares by IPC");
    dev.free(&unshareable).unwrap();
}
