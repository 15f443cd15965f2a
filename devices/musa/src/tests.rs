//! [`MusaDevice`] against the fake runtime of `fake.rs`: everything but the real hardware.

use std::sync::Arc;

use mooncake_core::registry::Availability;
use mooncake_core::{
    Access, AllocOptions, Allocation, DeviceMemory, Error, Location, MemoryDevice, MemoryKind, RegionTable,
    SharingHandle,
};

use crate::fake;
use crate::{MUSA_IPC_HANDLE_KIND, MusaDevice, probe};

fn musa(n: u32) -> Location {
    Location::Device(MemoryKind::Musa, n)
}

fn at(n: u32) -> AllocOptions {
    AllocOptions { location: musa(n), ..Default::default() }
}

/// A device over a fresh fake machine with `devices` devices (driver entry points included).
fn device(devices: i32) -> MusaDevice {
    fake::reset(devices);
    MusaDevice::with_api(&fake::WITH_DRIVER).expect("the fake runtime has devices")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn without_the_runtime_probe_and_new_are_typed_errors_naming_libmusart() {
    let why = match probe() {
        Availability::Available => {
            println!("a MUSA runtime with devices is present: skipped");
            return;
        }
        Availability::Unavailable(why) => why,
    };
    if crate::sys::api().is_err() {
        assert_eq!(why, "libmusart.so not found (no MUSA runtime on this machine)");
    }
    match MusaDevice::new() {
        Err(Error::Unavailable { reason }) => assert_eq!(reason, why),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let entry = mooncake_core::registry::devices().into_iter().find(|f| f.name == "musa").expect("registered as musa");
    assert_eq!((entry.probe)(), Availability::Unavailable(why.clone()));
    assert!(matches!((entry.create)(), Err(Error::Unavailable { .. })));
    assert!(mooncake_core::registry::available_devices().iter().all(|d| d.name() != "musa"));
}

#[test]
fn a_runtime_without_devices_is_unavailable() {
    fake::reset(0);
    match MusaDevice::with_api(&fake::WITH_DRIVER) {
        Err(Error::Unavailable { reason }) => assert_eq!(reason, "no MUSA device"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
fn describes_itself() {
    let dev = device(2);
    assert_eq!(dev.name(), "musa");
    assert_eq!(dev.kind(), MemoryKind::Musa);
    let caps = dev.capabilities();
    assert!(!caps.host_accessible && caps.export_handles);
    assert_eq!((caps.device_count, dev.device_count()), (2, 2));
    assert_eq!(dev.runtime_version().unwrap(), 40000);
    assert_eq!(dev.pci_address(&musa(1)).as_deref(), Some("0000:3b:00.0"));
    assert_eq!(dev.pci_address(&musa(0)).as_deref(), Some("0000:3a:00.0"));
    assert_eq!(dev.pci_address(&musa(2)), None);
    assert_eq!(dev.pci_address(&Location::Cpu(Some(0))), None);
    assert_eq!(dev.pci_address(&Location::Device(MemoryKind::Cuda, 0)), None);
}

#[test]
fn allocates_classifies_copies_and_frees() {
    let dev = device(2);
    let a = dev.allocate(4096, &AllocOptions::default()).unwrap();
    assert_eq!(a.location, musa(0), "`*` is the thread's current device");
    assert!(a.addr >= fake::BASE, "device memory comes from the runtime");
    let b = dev.allocate(1000, &at(1)).unwrap();
    assert_eq!(b.location, musa(1));
    assert_ne!(a.token, b.token);
    assert_eq!(dev.live_allocations(), 2);
    assert_eq!(dev.allocations(), vec![a.clone(), b.clone()]);

    assert_eq!(dev.classify(a.addr, a.len), Some(musa(0)));
    assert_eq!(dev.classify(a.addr + 10, 10), Some(musa(0)));
    assert_eq!(dev.classify(b.addr + 999, 1), Some(musa(1)));
    assert_eq!(dev.classify(a.addr, a.len + 1), None, "the range must lie inside the allocation");
    let host = [0u8; 64];
    assert_eq!(dev.classify(host.as_ptr() as u64, 64), None, "host memory is not MUSA memory");
    assert_eq!(fake::last_error(), 0, "the failed attribute query's sticky error is cleared");

    let data = pattern(1, 4096);
    dev.copy_from_host(&data, &a, 0).unwrap();
    assert_eq!(fake::peek(a.addr, 4096).unwrap(), data, "copy_from_host returns after the bytes landed");
    let mut back = vec![0u8; 100];
    dev.copy_to_host(&a, 50, &mut back).unwrap();
    assert_eq!(back, data[50..150]);
    dev.copy_from_host(b"tail", &b, 996).unwrap();
    let mut tail = [0u8; 4];
    dev.copy_to_host(&b, 996, &mut tail).unwrap();
    assert_eq!(&tail, b"tail");
    dev.copy_from_host(&[], &b, 1000).unwrap();
    assert!(matches!(dev.copy_from_host(b"tail", &b, 997), Err(Error::AddressNotRegistered { .. })));
    assert!(matches!(dev.copy_to_host(&b, u64::MAX, &mut tail), Err(Error::AddressNotRegistered { .. })));

    let mut stale = a.clone();
    stale.token += 100;
    assert!(matches!(dev.copy_to_host(&stale, 0, &mut back), Err(Error::NotFound(_))));
    assert!(matches!(dev.free(&stale), Err(Error::NotFound(_))));
    dev.free(&a).unwrap();
    assert!(matches!(dev.free(&a), Err(Error::NotFound(_))), "double free");
    assert!(matches!(dev.copy_to_host(&a, 0, &mut back), Err(Error::NotFound(_))), "copy of a freed buffer");
    assert!(matches!(dev.copy_from_host(&data, &a, 0), Err(Error::NotFound(_))));
    assert_eq!(dev.classify(a.addr, 1), None);
    dev.free(&b).unwrap();
    assert_eq!((dev.live_allocations(), fake::live()), (0, 0), "everything given back to the runtime");
}

#[test]
fn bad_locations_and_sizes_are_typed_errors() {
    let dev = device(2);
    assert!(matches!(dev.allocate(4096, &at(2)), Err(Error::DeviceNotFound(_))));
    for location in [Location::Cpu(Some(0)), Location::Cpu(None), Location::Device(MemoryKind::Cuda, 0)] {
        let r = dev.allocate(4096, &AllocOptions { location: location.clone(), ..Default::default() });
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{location}: {r:?}");
    }
    assert!(matches!(dev.allocate(0, &at(0)), Err(Error::InvalidArgument(_))));
    assert!(matches!(dev.allocate(u64::MAX, &at(0)), Err(Error::InvalidArgument(_))));
    let big = (fake::MAX_ALLOCATION + 1) as u64;
    assert!(matches!(dev.allocate(big, &at(0)), Err(Error::NoSpace(_))), "musaErrorMemoryAllocation");
    let odd = AllocOptions { alignment: 3, ..at(0) };
    assert!(matches!(dev.allocate(4096, &odd), Err(Error::InvalidArgument(_))));
    let aligned = dev.allocate(4096, &AllocOptions { alignment: 1 << 16, ..at(0) }).unwrap();
    assert_eq!(aligned.addr % (1 << 16), 0);
    let huge = AllocOptions { alignment: 1 << 40, ..at(0) };
    assert!(matches!(dev.allocate(4096, &huge), Err(Error::InvalidArgument(_))));
    assert_eq!(fake::live(), 1, "memory of a refused allocation is given back");
    dev.free(&aligned).unwrap();
}

#[test]
fn the_threads_current_device_is_restored() {
    let dev = device(2);
    fake::select(1);
    let a = dev.allocate(4096, &at(0)).unwrap();
    assert_eq!(fake::current(), 1, "allocate switched to musa:0 and back");
    dev.copy_from_host(b"x", &a, 0).unwrap();
    assert_eq!(fake::current(), 1);
    let calls = fake::set_device_calls();
    let b = dev.allocate(4096, &at(1)).unwrap();
    dev.copy_from_host(b"y", &b, 0).unwrap();
    assert_eq!(fake::set_device_calls(), calls, "no switch when the device is already current");
    dev.free(&a).unwrap();
    assert_eq!(fake::current(), 1, "free switched to musa:0 and back");
    // A thread that never used MUSA is not given a context on a device it did not ask for.
    fake::drop_context();
    fake::select(0);
    fake::drop_context();
    dev.free(&b).unwrap();
    assert_eq!(fake::current(), 1);
}

#[test]
fn copies_between_allocations_on_one_device_and_across_devices() {
    let dev = device(2);
    let a = dev.allocate(8192, &at(0)).unwrap();
    let b = dev.allocate(8192, &at(0)).unwrap();
    let c = dev.allocate(8192, &at(1)).unwrap();
    let data = pattern(2, 8192);
    dev.copy_from_host(&data, &a, 0).unwrap();
    dev.copy_between(&a, 10, &b, 20, 100).unwrap();
    assert_eq!(fake::peek(b.addr + 20, 100).unwrap(), data[10..110], "landed when copy_between returns");
    dev.copy_between(&a, 0, &c, 0, 8192).unwrap();
    assert_eq!(fake::peek(c.addr, 8192).unwrap(), data, "peer copy landed when copy_between returns");
    dev.copy_between(&c, 8000, &a, 0, 0).unwrap();
    assert!(matches!(dev.copy_between(&a, 8000, &b, 0, 193), Err(Error::AddressNotRegistered { .. })));
    assert!(matches!(dev.copy_between(&a, 0, &b, 8100, 100), Err(Error::AddressNotRegistered { .. })));
    dev.free(&b).unwrap();
    assert!(matches!(dev.copy_between(&a, 0, &b, 0, 1), Err(Error::NotFound(_))), "freed destination");
    assert!(matches!(dev.copy_between(&b, 0, &a, 0, 1), Err(Error::NotFound(_))), "freed source");
    dev.free(&a).unwrap();
    dev.free(&c).unwrap();
}

#[test]
fn a_hold_defers_the_free_and_registers_as_device_memory() {
    let dev: Arc<dyn MemoryDevice> = Arc::new(device(1));
    let a = dev.allocate(4096, &at(0)).unwrap();
    dev.copy_from_host(b"kept", &a, 0).unwrap();
    let held = dev.hold(&a).unwrap();
    assert_eq!((held.addr(), held.len()), (a.addr, a.len));
    dev.free(&a).unwrap();
    assert_eq!(fake::live(), 1, "still allocated while held");
    assert!(matches!(dev.hold(&a), Err(Error::NotFound(_))), "a freed allocation cannot be held again");

    let b = dev.allocate(4096, &at(0)).unwrap();
    dev.copy_from_host(b"moved", &b, 8).unwrap();
    let table = RegionTable::new();
    let owner = DeviceMemory { device: dev.clone(), allocation: b.clone() };
    table.insert_held(dev.hold(&b).unwrap(), musa(0), Some(owner)).unwrap();
    let region = table.lookup(b.addr + 8, 5).unwrap();
    let Access::Device(d) = region.access() else { panic!("MUSA memory is not host memory: {:?}", region.access()) };
    let mut out = [0u8; 5];
    d.copy_to_host(b.addr + 8, &mut out).unwrap();
    assert_eq!(&out, b"moved");
    drop(region);

    drop(held);
    assert_eq!(fake::live(), 1, "the first buffer went back when its hold ended");
    dev.free(&b).unwrap();
    table.remove(b.addr, std::time::Duration::from_secs(1)).unwrap();
    assert_eq!(fake::live(), 0);
}

#[test]
fn foreign_memory_is_found_and_rechecked_before_each_use() {
    let dev = device(2);
    let p = fake::foreign_malloc(1, 8192);
    assert_eq!(dev.classify(p + 100, 100), Some(musa(1)));
    assert_eq!(dev.classify(p, 8193), None);
    let a = dev.allocation_of(p + 100, 10).unwrap();
    assert_eq!(a, Allocation { addr: p, len: 8192, location: musa(1), token: 0 });
    dev.copy_from_host(b"foreign", &a, 100).unwrap();
    let mut out = [0u8; 7];
    dev.copy_to_host(&a, 100, &mut out).unwrap();
    assert_eq!(&out, b"foreign");
    let own = dev.allocate(8192, &at(0)).unwrap();
    dev.copy_between(&a, 0, &own, 0, 8192).unwrap();
    assert_eq!(fake::peek(own.addr + 100, 7).unwrap(), b"foreign");
    assert!(matches!(dev.hold(&a), Err(Error::Unsupported { .. })), "memory it does not own cannot be held");
    assert!(matches!(dev.free(&a), Err(Error::NotFound(_))), "nor freed");
    let h = dev.export_handle(&a).unwrap();
    assert_eq!(h.kind, MUSA_IPC_HANDLE_KIND);
    let inner = Allocation { addr: p + 4096, len: 16, location: musa(1), token: 0 };
    assert!(matches!(dev.export_handle(&inner), Err(Error::InvalidArgument(_))), "not an allocation's start");
    let elsewhere = Allocation { location: musa(0), ..a.clone() };
    assert!(matches!(dev.copy_to_host(&elsewhere, 0, &mut out), Err(Error::NotFound(_))), "wrong device");
    let longer = Allocation { len: 8193, ..a.clone() };
    assert!(matches!(dev.copy_to_host(&longer, 0, &mut out), Err(Error::NotFound(_))), "past its allocation");

    fake::foreign_free(p);
    assert!(matches!(dev.copy_to_host(&a, 100, &mut out), Err(Error::NotFound(_))), "freed by its owner");
    assert!(matches!(dev.copy_from_host(b"x", &a, 0), Err(Error::NotFound(_))));
    assert!(matches!(dev.copy_between(&own, 0, &a, 0, 1), Err(Error::NotFound(_))));
    assert_eq!(dev.classify(p, 1), None);
    assert_eq!(dev.allocation_of(p, 1), None);
    dev.free(&own).unwrap();
}

#[test]
fn without_the_driver_foreign_memory_is_classified_but_not_touched() {
    fake::reset(2);
    let dev = MusaDevice::with_api(&fake::WITHOUT_DRIVER).unwrap();
    let p = fake::foreign_malloc(1, 8192);
    assert_eq!(dev.classify(p, 8192), Some(musa(1)), "both ends are device memory of musa:1");
    assert_eq!(dev.classify(p, 8193), None);
    assert_eq!(dev.allocation_of(p, 8192), None, "no address range without the driver");
    let a = Allocation { addr: p, len: 8192, location: musa(1), token: 0 };
    assert!(matches!(dev.copy_from_host(b"x", &a, 0), Err(Error::Unsupported { .. })));
    let own = dev.allocate(4096, &at(1)).unwrap();
    dev.copy_from_host(b"own", &own, 0).unwrap();
    assert_eq!(dev.classify(own.addr, 4096), Some(musa(1)));
    assert_eq!(dev.allocation_of(own.addr + 1, 2), Some(own.clone()), "its own records need no driver");
    dev.free(&own).unwrap();
    fake::foreign_free(p);
}

#[test]
fn exports_and_imports_ipc_handles() {
    let dev = device(2);
    let a = dev.allocate(8192, &at(1)).unwrap();
    let data = pattern(3, 8192);
    dev.copy_from_host(&data, &a, 0).unwrap();
    let h = dev.export_handle(&a).unwrap();
    assert_eq!((h.kind.as_str(), h.data.len(), h.len, h.fd.is_none()), (MUSA_IPC_HANDLE_KIND, 64, 8192, true));

    fake::select(0);
    let b = dev.import_handle(&h).unwrap();
    assert_ne!(b.addr, a.addr);
    assert_eq!((b.len, b.location.clone()), (8192, musa(1)), "located on the device that holds the memory");
    assert_eq!(dev.classify(b.addr + 8, 8), Some(musa(1)));
    let mut out = vec![0u8; 8192];
    dev.copy_to_host(&b, 0, &mut out).unwrap();
    assert_eq!(out, data);
    dev.copy_from_host(b"through the import", &b, 100).unwrap();
    assert_eq!(fake::peek(a.addr + 100, 18).unwrap(), b"through the import");
    // The import lives in musa:0's context, the export in musa:1's: a peer copy.
    dev.copy_between(&a, 0, &b, 4096, 16).unwrap();
    assert_eq!(fake::peek(a.addr + 4096, 16).unwrap(), data[..16]);
    assert!(matches!(dev.export_handle(&b), Err(Error::InvalidArgument(_))), "imports are not exported again");

    let again = dev.import_handle(&h).unwrap();
    assert_eq!(again, b, "a second import of one handle shares the mapping");
    let bigger = SharingHandle { len: 8193, ..h.clone() };
    assert!(matches!(dev.import_handle(&bigger), Err(Error::InvalidArgument(_))));
    let live = fake::live();
    dev.free(&b).unwrap();
    assert_eq!(fake::live(), live, "still mapped for the other import");
    dev.copy_to_host(&b, 0, &mut out[..8]).unwrap();
    dev.free(&b).unwrap();
    assert_eq!(fake::live(), live - 1, "the last free closes the mapping");
    assert!(matches!(dev.free(&b), Err(Error::NotFound(_))));
    assert!(matches!(dev.copy_to_host(&b, 0, &mut out), Err(Error::NotFound(_))));
    assert!(matches!(dev.import_handle_on(&h, 2), Err(Error::DeviceNotFound(_))));
    let c = dev.import_handle_on(&h, 1).unwrap();
    dev.free(&c).unwrap();

    dev.free(&a).unwrap();
    assert!(dev.import_handle(&h).is_err(), "the exporter freed it: the runtime refuses the handle");
    assert_eq!(fake::live(), 0);
}

#[test]
fn bad_handles_are_invalid_arguments() {
    let dev = device(1);
    let ok = SharingHandle { kind: MUSA_IPC_HANDLE_KIND.into(), data: vec![0; 64], fd: None, len: 4096 };
    for bad in [
        SharingHandle { kind: "cuda_ipc".into(), ..ok.clone() },
        SharingHandle { kind: "memfd".into(), ..ok.clone() },
        SharingHandle { data: vec![0; 32], ..ok.clone() },
        SharingHandle { data: vec![0; 65], ..ok.clone() },
        SharingHandle { len: 0, ..ok.clone() },
    ] {
        assert!(matches!(dev.import_handle(&bad), Err(Error::InvalidArgument(_))), "{bad:?}");
    }
    // Well formed but unknown to the runtime: its error, typed.
    assert!(matches!(dev.import_handle(&ok), Err(Error::InvalidArgument(_))));
    assert_eq!(dev.live_allocations(), 0);
}

#[test]
fn an_import_whose_mapping_vanished_is_an_error_not_a_crash() {
    let dev = device(1);
    let a = dev.allocate(4096, &at(0)).unwrap();
    let b = dev.import_handle(&dev.export_handle(&a).unwrap()).unwrap();
    // Someone closes the mapping behind the device's back.
    // SAFETY: the fake's close takes any address and only edits the fake machine.
    assert_eq!(unsafe { (fake::WITH_DRIVER.ipc_close_mem_handle)(b.addr as *mut std::ffi::c_void) }, 0);
    let mut out = [0u8; 4];
    assert!(matches!(dev.copy_to_host(&b, 0, &mut out), Err(Error::NotFound(_))));
    assert!(matches!(dev.copy_between(&a, 0, &b, 0, 4), Err(Error::NotFound(_))));
    dev.free(&b).unwrap(); // the close fails in the runtime; logged, not returned
    dev.free(&a).unwrap();
}

#[test]
fn dropping_the_device_gives_everything_back() {
    let dev = device(2);
    let a = dev.allocate(4096, &at(0)).unwrap();
    dev.allocate(4096, &at(1)).unwrap();
    let h = dev.export_handle(&a).unwrap();
    dev.import_handle(&h).unwrap();
    assert_eq!(fake::live(), 3);
    drop(dev);
    assert_eq!(fake::live(), 0);
}
