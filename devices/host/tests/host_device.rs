//! HostDevice through the `MemoryDevice` trait: allocate, classify, copy, free, share.

use std::sync::Arc;

use mooncake_core::{AllocOptions, Error, Location, MemoryDevice, MemoryKind};
use mooncake_device_host::{HostDevice, MEMFD_HANDLE_KIND, PageKind};

fn device() -> Arc<dyn MemoryDevice> {
    Arc::new(HostDevice::new())
}

#[test]
fn registered_in_the_registry() {
    mooncake_device_host::link();
    let f = mooncake_core::registry::devices().into_iter().find(|f| f.name == "host").expect("host is registered");
    assert!((f.probe)().is_available());
    let dev = (f.create)().expect("create");
    assert_eq!(dev.name(), "host");
    assert_eq!(dev.kind(), MemoryKind::Host);
    let caps = dev.capabilities();
    assert!(caps.host_accessible && caps.export_handles && caps.device_count >= 1);
    assert!(mooncake_core::registry::available_devices().iter().any(|d| d.name() == "host"));
}

#[test]
fn allocate_classify_copy_free() {
    let dev = device();
    let a = dev.allocate(100_000, &AllocOptions::default()).expect("allocate");
    assert_eq!(a.len, 100_000);
    assert_eq!(a.addr % 4096, 0, "page aligned");

    // Untouched memory classifies as some CPU node without being faulted in.
    assert!(matches!(dev.classify(a.addr, a.len), Some(Location::Cpu(Some(_)))));

    let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7 + 3) as u8).collect();
    dev.copy_from_host(&data, &a, 50_000).expect("write at the very end");
    let mut back = vec![0u8; data.len()];
    dev.copy_to_host(&a, 50_000, &mut back).expect("read");
    assert_eq!(back, data);
    // Fresh anonymous memory is zeroed.
    let mut head = vec![1u8; 4096];
    dev.copy_to_host(&a, 0, &mut head).expect("read head");
    assert!(head.iter().all(|&b| b == 0));

    // Touched memory classifies by the node actually holding it.
    let node = match dev.classify(a.addr + 50_000, 1) {
        Some(Location::Cpu(Some(n))) => n,
        other => panic!("unexpected {other:?}"),
    };
    let online = mooncake_device_host::numa::online_nodes();
    assert!(online.contains(&node), "node {node} not in {online:?}");

    // Any address is host memory to this device (others are asked first by the engine).
    let stack = 0u64;
    assert!(dev.classify(&stack as *const u64 as u64, 8).is_some());

    // Bounds are checked.
    let oob = dev.copy_from_host(&[1, 2], &a, a.len - 1);
    assert!(matches!(oob, Err(Error::AddressNotRegistered { .. })), "{oob:?}");
    let oob = dev.copy_to_host(&a, u64::MAX, &mut [0u8; 4]);
    assert!(matches!(oob, Err(Error::AddressNotRegistered { .. })), "{oob:?}");
    dev.copy_to_host(&a, a.len, &mut []).expect("empty copy at the end is fine");

    dev.free(&a).expect("free");
    let again = dev.free(&a);
    assert!(matches!(again, Err(Error::NotFound(_))), "double free: {again:?}");
    let after = dev.copy_to_host(&a, 0, &mut [0u8; 1]);
    assert!(matches!(after, Err(Error::NotFound(_))), "use after free: {after:?}");
}

#[test]
fn foreign_allocations_are_rejected() {
    let dev = device();
    let other = HostDevice::new();
    let a = other.allocate(4096, &AllocOptions::default()).expect("allocate");
    assert!(matches!(dev.free(&a), Err(Error::NotFound(_))));
    assert!(matches!(dev.copy_from_host(&[1], &a, 0), Err(Error::NotFound(_))));
    assert!(matches!(dev.copy_to_host(&a, 0, &mut [0]), Err(Error::NotFound(_))));
    assert!(matches!(dev.export_handle(&a), Err(Error::NotFound(_))));
    other.free(&a).expect("its owner frees it");
}

#[test]
fn zero_length_is_invalid() {
    let dev = HostDevice::new();
    assert!(matches!(dev.allocate(0, &AllocOptions::default()), Err(Error::InvalidArgument(_))));
    assert!(matches!(dev.allocate_shared(0), Err(Error::InvalidArgument(_))));
    assert_eq!(dev.live_allocations(), 0);
}

#[test]
fn large_alignments_are_honoured() {
    let dev = HostDevice::new();
    for shift in [12u32, 16, 21, 26, 30] {
        let align = 1u64 << shift;
        let a = dev.allocate(12_345, &AllocOptions { alignment: align, ..Default::default() }).expect("allocate");
        assert_eq!(a.addr % align, 0, "alignment {align}");
        dev.copy_from_host(&[0xAB; 16], &a, 12_345 - 16).expect("write");
        dev.free(&a).expect("free");
    }
}

#[test]
fn huge_page_request_succeeds_with_or_without_huge_pages() {
    let dev = HostDevice::new();
    let opts = AllocOptions { huge_pages: true, ..Default::default() };
    let a = dev.allocate(3 << 20, &opts).expect("huge page request falls back instead of failing");
    let info = dev.allocation_info(a.addr).expect("info");
    assert!(matches!(info.pages, PageKind::HugeTlb | PageKind::TransparentHuge | PageKind::Normal));
    assert!(info.mapped_len >= 3 << 20);
    if info.pages != PageKind::Normal {
        assert_eq!(a.addr % (2 << 20), 0, "huge-page backed memory is huge-page aligned");
    }
    eprintln!("huge page request served with {:?}", info.pages);
    let data = vec![0x5Au8; 3 << 20];
    dev.copy_from_host(&data, &a, 0).expect("write");
    let mut back = vec![0u8; 3 << 20];
    dev.copy_to_host(&a, 0, &mut back).expect("read");
    assert_eq!(back, data);
    dev.free(&a).expect("free");
}

#[test]
fn numa_binding() {
    let dev = HostDevice::new();
    let node = dev.topology().node_ids()[0];
    let opts = AllocOptions { location: Location::Cpu(Some(node)), ..Default::default() };
    let a = dev.allocate(1 << 20, &opts).expect("bind to an online node");
    assert_eq!(a.location, Location::Cpu(Some(node)));
    dev.copy_from_host(&[1u8; 4096], &a, 0).expect("touch");
    assert_eq!(dev.classify(a.addr, 4096), Some(Location::Cpu(Some(node))));
    dev.free(&a).expect("free");

    let missing = dev.topology().node_ids().iter().max().copied().unwrap_or(0) + 1;
    let opts = AllocOptions { location: Location::Cpu(Some(missing)), ..Default::default() };
    let err = dev.allocate(4096, &opts);
    assert!(matches!(err, Err(Error::DeviceNotFound(_))), "{err:?}");
}

#[test]
fn memfd_export_import_round_trip() {
    let exporter = HostDevice::new();
    let importer = HostDevice::new();
    let a = exporter.allocate_shared(10_000).expect("allocate_shared");
    let handle = exporter.export_handle(&a).expect("export");
    assert_eq!(handle.kind, MEMFD_HANDLE_KIND);
    assert_eq!(handle.len, 10_000);
    assert!(handle.fd.is_some());

    let b = importer.import_handle(&handle).expect("import");
    assert_ne!(a.addr, b.addr, "a second mapping of the same file");
    assert_eq!(b.len, 10_000);
    let info = importer.allocation_info(b.addr).expect("info");
    assert!(info.imported && info.exportable);

    exporter.copy_from_host(b"written through the exporter", &a, 9_000).expect("write a");
    let mut out = [0u8; 28];
    importer.copy_to_host(&b, 9_000, &mut out).expect("read b");
    assert_eq!(&out, b"written through the exporter");

    importer.copy_from_host(b"and back", &b, 0).expect("write b");
    let mut out = [0u8; 8];
    exporter.copy_to_host(&a, 0, &mut out).expect("read a");
    assert_eq!(&out, b"and back");

    // The exporter can free first; the import keeps the file alive.
    exporter.free(&a).expect("free a");
    drop(handle);
    let mut out = [0u8; 8];
    importer.copy_to_host(&b, 0, &mut out).expect("still readable");
    assert_eq!(&out, b"and back");
    importer.free(&b).expect("free b");
}

#[test]
fn anonymous_allocations_cannot_be_exported() {
    let dev = HostDevice::new();
    let a = dev.allocate(4096, &AllocOptions::default()).expect("allocate");
    assert!(matches!(dev.export_handle(&a), Err(Error::Unsupported { .. })));
    dev.free(&a).expect("free");
}

#[test]
fn concurrent_allocate_copy_free() {
    let dev = Arc::new(HostDevice::new());
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let dev = Arc::clone(&dev);
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let len = 4096 + i * 61;
                    let a = dev.allocate(len, &AllocOptions::default()).expect("allocate");
                    let data = vec![t; len as usize];
                    dev.copy_from_host(&data, &a, 0).expect("write");
                    let mut back = vec![0u8; len as usize];
                    dev.copy_to_host(&a, 0, &mut back).expect("read");
                    assert_eq!(back, data);
                    dev.free(&a).expect("free");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    assert_eq!(dev.live_allocations(), 0);
}

/// Resident set size of this process in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn prefault_makes_pages_resident_and_keeps_contents() {
    let dev = device();
    let len = 64u64 << 20;
    let a = dev.allocate(len, &AllocOptions::default()).expect("allocate");
    dev.copy_from_host(b"kept", &a, 4096).unwrap();
    let before = rss();
    dev.prefault(&a).expect("prefault");
    let grown = rss().saturating_sub(before);
    // MADV_POPULATE_WRITE needs Linux 5.14; on older kernels the hint does nothing.
    let modern = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .and_then(|r| {
            let mut v = r.trim().split(['.', '-']).map(|x| x.parse::<u32>().unwrap_or(0));
            Some((v.next()?, v.next()?))
        })
        .is_some_and(|v| v >= (5, 14));
    if modern {
        assert!(grown >= len - (4 << 20), "only {grown} bytes became resident");
    }
    let mut back = [0u8; 4];
    dev.copy_to_host(&a, 4096, &mut back).unwrap();
    assert_eq!(&back, b"kept");
    let mut zero = [1u8; 16];
    dev.copy_to_host(&a, len - 16, &mut zero).unwrap();
    assert_eq!(zero, [0u8; 16], "fresh memory stays zero");
    dev.free(&a).unwrap();
    assert!(matches!(dev.prefault(&a), Err(Error::NotFound(_))), "a freed allocation is a typed error");
}
