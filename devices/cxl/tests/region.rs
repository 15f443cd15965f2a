//! The CXL device over file-backed regions: bad input, header checks, allocation shared between mappings and
//! processes, the publication table, the lock.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{CHILD_ENV, ChildProc, read_stdin_line, region_file, say};
use mooncake_core::{AllocOptions, Error, Location, MemoryDevice, MemoryKind, SharingHandle};
use mooncake_device_cxl::{CxlConfig, CxlDevice, CxlError, OwnerKind, Refusal, layout};

const MIB: u64 = 1 << 20;

fn open(path: &Path) -> Arc<CxlDevice> {
    CxlDevice::open(&CxlConfig::new(path)).unwrap()
}

fn names_path(e: &CxlError, path: &Path) {
    let msg = e.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg:?} does not name {}", path.display());
}

#[test]
fn missing_directory_null_and_short_paths_are_typed_errors() {
    let (dir, _) = region_file(MIB);
    let missing = dir.path().join("nope");
    let e = CxlDevice::open(&CxlConfig::new(&missing)).unwrap_err();
    assert!(matches!(e, CxlError::PathMissing { .. }), "{e:?}");
    names_path(&e, &missing);

    let e = CxlDevice::open(&CxlConfig::new(dir.path()).with_size(MIB)).unwrap_err();
    assert!(matches!(&e, CxlError::NotMappable { reason, .. } if reason.contains("directory")), "{e:?}");
    names_path(&e, dir.path());

    // /dev/null: a character device that is not DAX; with a size it opens, and mmap refuses it.
    let null = Path::new("/dev/null");
    let e = CxlDevice::open(&CxlConfig::new(null)).unwrap_err();
    assert!(matches!(&e, CxlError::NotMappable { reason, .. } if reason.contains("not a DAX device")), "{e:?}");
    let e = CxlDevice::open(&CxlConfig::new(null).with_size(64 * MIB)).unwrap_err();
    assert!(matches!(&e, CxlError::NotMappable { reason, .. } if reason.contains("mmap")), "{e:?}");
    names_path(&e, null);

    // A file shorter than the configured size.
    let (_d, short) = region_file(MIB);
    let e = CxlDevice::open(&CxlConfig::new(&short).with_size(2 * MIB)).unwrap_err();
    assert!(matches!(e, CxlError::TooSmall { have, need, .. } if have == MIB && need == 2 * MIB), "{e:?}");
    names_path(&e, &short);

    // Too small for the header and its tables (the default tables take about 400 KiB).
    let (_d, tiny) = region_file(256 << 10);
    let e = CxlDevice::open(&CxlConfig::new(&tiny)).unwrap_err();
    assert!(matches!(e, CxlError::TooSmall { have, .. } if have == 256 << 10), "{e:?}");
    // ... which leaves the file as it was: a right-sized open of a larger file works afterwards.
    std::fs::File::options().write(true).open(&tiny).unwrap().set_len(4 * MIB).unwrap();
    open(&tiny);

    // An empty file with no size configured.
    let (_d, empty) = region_file(0);
    let e = CxlDevice::open(&CxlConfig::new(&empty)).unwrap_err();
    assert!(matches!(e, CxlError::SizeUnknown { .. }), "{e:?}");
    names_path(&e, &empty);

    // Typed errors become core errors a caller can act on.
    assert!(matches!(Error::from(CxlError::PathMissing { path: missing }), Error::Unavailable { .. }));
}

#[test]
fn permission_denied_names_the_path() {
    if std::env::var(CHILD_ENV).as_deref() == Ok("open-denied") {
        let path = std::env::var("MC_CXL_TEST_PATH").unwrap();
        let e = CxlDevice::open(&CxlConfig::new(&path)).unwrap_err();
        say(&format!("error {}", matches!(e, CxlError::PermissionDenied { .. })));
        say(&format!("message {e}"));
        return;
    }
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let (dir, path) = region_file(4 * MIB);
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        let e = CxlDevice::open(&CxlConfig::new(&path)).unwrap_err();
        assert!(matches!(e, CxlError::PermissionDenied { .. }), "{e:?}");
        names_path(&e, &path);
        return;
    }
    // Root opens anything: ask an unprivileged child (same test binary) to open a file only root may write.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", "permission_denied_names_the_path", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "open-denied")
        .env("MC_CXL_TEST_PATH", &path)
        .uid(65534)
        .gid(65534)
        .output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        other => {
            eprintln!("skipping: cannot run the test binary as an unprivileged user here: {other:?}");
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("error true"), "child output: {text}");
    assert!(text.contains(&path.display().to_string()) && text.contains("permission denied"), "child output: {text}");
}

#[test]
fn header_mismatch_corruption_and_garbage_are_refused() {
    let (_d, path) = region_file(8 * MIB);
    let dev = open(&path);
    let data_offset = dev.region().layout().data_offset;
    drop(dev);
    let field = |c: CxlConfig| match CxlDevice::open(&c).unwrap_err() {
        CxlError::HeaderMismatch { field, found, expected, path: p } => {
            assert_eq!(p, path);
            (field, found, expected)
        }
        other => panic!("{other:?}"),
    };
    // A stated size must equal the header's.
    assert_eq!(
        field(CxlConfig::new(&path).with_size(4 * MIB)),
        ("region_size", (8 * MIB).to_string(), (4 * MIB).to_string())
    );
    assert_eq!(field(CxlConfig { granularity: Some(8192), ..CxlConfig::new(&path) }).0, "granularity");
    assert_eq!(field(CxlConfig { max_buffers: Some(10), ..CxlConfig::new(&path) }).0, "max_buffers");
    assert_eq!(field(CxlConfig { max_allocations: Some(10), ..CxlConfig::new(&path) }).0, "max_allocations");
    // Unstated settings are taken from the header; a larger file than the region is fine.
    std::fs::File::options().write(true).open(&path).unwrap().set_len(16 * MIB).unwrap();
    let dev = open(&path);
    assert_eq!(dev.region().size(), 8 * MIB);
    assert_eq!(dev.region().layout().data_offset, data_offset);
    drop(dev);

    let file = std::fs::File::options().read(true).write(true).open(&path).unwrap();
    // Another version.
    file.write_at(&7u64.to_le_bytes(), layout::H_VERSION).unwrap();
    assert_eq!(field(CxlConfig::new(&path)), ("version", "7".into(), layout::VERSION.to_string()));
    file.write_at(&layout::VERSION.to_le_bytes(), layout::H_VERSION).unwrap();
    // A layout word changed behind the checksum's back.
    file.write_at(&12345u64.to_le_bytes(), layout::H_MAX_OWNERS).unwrap();
    let e = CxlDevice::open(&CxlConfig::new(&path)).unwrap_err();
    assert!(matches!(e, CxlError::CorruptHeader { .. }), "{e:?}");
    names_path(&e, &path);

    // Garbage (or another program's data) is never reused, unless asked to.
    file.write_at(b"not a mooncake header", 0).unwrap();
    let e = CxlDevice::open(&CxlConfig::new(&path)).unwrap_err();
    assert!(matches!(e, CxlError::ForeignHeader { .. }), "{e:?}");
    assert!(e.to_string().contains("MC_CXL_FORMAT=1"), "{e}");
    names_path(&e, &path);
    let dev = CxlDevice::open(&CxlConfig { format_foreign: true, ..CxlConfig::new(&path) }).unwrap();
    assert_eq!(dev.region().size(), 16 * MIB, "re-initialized with the file's length");
    // Bytes after a zero magic word also count as garbage.
    let (_d2, other) = region_file(8 * MIB);
    std::fs::File::options().write(true).open(&other).unwrap().write_at(b"x", 100).unwrap();
    assert!(matches!(CxlDevice::open(&CxlConfig::new(&other)), Err(CxlError::ForeignHeader { .. })));
}

#[test]
fn allocate_copy_hold_export_and_free() {
    let (_d, path) = region_file(64 * MIB);
    let dev = open(&path);
    let region = dev.region().clone();
    let a = dev.allocate(10_000, &AllocOptions::default()).unwrap();
    assert_eq!(a.len, 10_000);
    assert_eq!(a.location, Location::Device(MemoryKind::Cxl, 0));
    assert_eq!(dev.classify(a.addr, a.len), Some(Location::Device(MemoryKind::Cxl, 0)));
    assert_eq!(dev.classify(region.base() - 1, 1), None);
    let off = region.offset_of(a.addr, a.len).unwrap();
    assert!(off >= region.layout().data_offset);
    dev.copy_from_host(b"hello cxl", &a, 100).unwrap();
    // The bytes are in the file at the allocation's offset.
    let mut disk = [0u8; 9];
    std::fs::File::open(&path).unwrap().read_at(&mut disk, off + 100).unwrap();
    assert_eq!(&disk, b"hello cxl");
    // Out of bounds, stale copies, double free.
    assert!(dev.copy_to_host(&a, 9_995, &mut [0u8; 10]).is_err());
    let mut stale = a.clone();
    stale.token += 1;
    assert!(matches!(dev.free(&stale), Err(Error::NotFound(_))));
    // Alignment up to the maximum, refused beyond or when not a power of two.
    let big = dev.allocate(100, &AllocOptions { alignment: 2 * MIB, ..Default::default() }).unwrap();
    assert_eq!(big.addr % (2 * MIB), 0);
    assert!(matches!(
        dev.allocate(100, &AllocOptions { alignment: 3, ..Default::default() }),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(dev.allocate(0, &AllocOptions::default()), Err(Error::InvalidArgument(_))));
    let cuda = AllocOptions { location: Location::Device(MemoryKind::Cuda, 0), ..Default::default() };
    assert!(matches!(dev.allocate(100, &cuda), Err(Error::InvalidArgument(_))));
    // Export as a file handle; importing it here is a view of the same bytes.
    let h = dev.export_handle(&a).unwrap();
    assert_eq!(h.kind, mooncake_device_cxl::FILE_HANDLE_KIND);
    assert_eq!(h.data, off.to_le_bytes());
    let view = dev.import_handle(&h).unwrap();
    let mut got = [0u8; 9];
    dev.copy_to_host(&view, 100, &mut got).unwrap();
    assert_eq!(&got, b"hello cxl");
    dev.free(&view).unwrap();
    // A handle of another file is the host device's business.
    let (_d2, other) = region_file(MIB);
    let fd = std::os::fd::OwnedFd::from(std::fs::File::open(&other).unwrap());
    let foreign = SharingHandle { kind: h.kind.clone(), data: vec![], fd: Some(Arc::new(fd)), len: 4096 };
    assert!(matches!(dev.import_handle(&foreign), Err(Error::Unsupported { .. })));
    // A header range is never handed out.
    let header = SharingHandle { data: vec![], ..h.clone() };
    assert!(matches!(dev.import_handle(&header), Err(Error::InvalidArgument(_))));
    // A hold keeps the bytes reserved after free; they are given back when it ends.
    let held = dev.hold(&a).unwrap();
    dev.free(&a).unwrap();
    assert!(matches!(dev.free(&a), Err(Error::NotFound(_))));
    assert!(region.allocations().iter().any(|(o, _)| *o == off), "reserved while held");
    drop(held);
    assert!(!region.allocations().iter().any(|(o, _)| *o == off), "given back with the hold");
    dev.free(&big).unwrap();
    assert!(region.allocations().is_empty());
    // Running out is NoSpace, naming the region.
    let data = region.layout().data_bytes();
    let all = dev.allocate(data, &AllocOptions::default()).unwrap();
    match dev.allocate(1, &AllocOptions::default()) {
        Err(Error::NoSpace(m)) => assert!(m.contains(&path.display().to_string()), "{m}"),
        other => panic!("{other:?}"),
    }
    dev.free(&all).unwrap();
}

#[test]
fn two_mappings_hand_out_disjoint_bytes_and_share_them() {
    let (_d, path) = region_file(64 * MIB);
    let a = open(&path);
    let b = open(&path);
    assert_ne!(a.region().base(), b.region().base(), "separate mappings");
    assert_eq!(a.region().id(), b.region().id());
    let mut got: Vec<(u64, u64)> = Vec::new();
    std::thread::scope(|s| {
        let hs: Vec<_> = [a.clone(), b.clone(), a.clone(), b.clone()]
            .into_iter()
            .map(|d| {
                s.spawn(move || {
                    (0..50)
                        .map(|i| {
                            let x = d.allocate(4096 * (1 + i % 7), &AllocOptions::default()).unwrap();
                            let off = x.addr - d.region().base();
                            std::mem::forget(x);
                            (off, 4096 * (1 + i % 7))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in hs {
            got.extend(h.join().unwrap());
        }
    });
    got.sort_unstable();
    for w in got.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "overlap: {w:?}");
    }
    // Bytes written through one mapping are read through the other at the same offset.
    let x = a.allocate(4096, &AllocOptions::default()).unwrap();
    a.copy_from_host(b"shared", &x, 0).unwrap();
    let off = x.addr - a.region().base();
    let view = b
        .import_handle(&SharingHandle {
            kind: "file".into(),
            data: off.to_le_bytes().to_vec(),
            fd: Some(b.region().fd().clone()),
            len: 4096,
        })
        .unwrap();
    let mut out = [0u8; 6];
    b.copy_to_host(&view, 0, &mut out).unwrap();
    assert_eq!(&out, b"shared");
}

/// A named area is reserved once and shared by every mapping; it belongs to no process (its creator going away
/// leaves it), other allocations keep out of it, and `0` takes the largest free range.
#[test]
fn named_areas_are_shared_by_name_and_outlive_their_creator() {
    let (_d, path) = region_file(64 * MIB);
    let a = open(&path);
    let b = open(&path);
    let offset_of = |d: &CxlDevice, x: &mooncake_core::Allocation| x.addr - d.region().base();
    let held = a.allocate(MIB, &AllocOptions::default()).unwrap();
    let area_a = a.attach_named("store", 8 * MIB).unwrap();
    assert_eq!(area_a.len, 8 * MIB);
    let area_b = b.attach_named("store", 1).unwrap(); // an existing area whatever the length asked
    assert_eq!((offset_of(&b, &area_b), area_b.len), (offset_of(&a, &area_a), 8 * MIB));
    let handle = b.export_handle(&area_b).unwrap();
    assert_eq!(handle.data, offset_of(&b, &area_b).to_le_bytes(), "the handle tells where the area lies");
    a.copy_from_host(b"through a", &area_a, 4096).unwrap();
    let mut out = [0u8; 9];
    b.copy_to_host(&area_b, 4096, &mut out).unwrap();
    assert_eq!(&out, b"through a");

    let other = b.attach_named("other", 2 * MIB).unwrap();
    let (o, s) = (offset_of(&b, &other), offset_of(&b, &area_b));
    assert!(o + other.len <= s || s + area_b.len <= o, "named areas overlap");
    assert!(matches!(a.attach_named("", MIB), Err(Error::InvalidArgument(_))));

    // Freeing a view, and the creating mapping going away, leave the area reserved with its bytes.
    a.free(&area_a).unwrap();
    a.free(&held).unwrap();
    drop(a);
    let c = open(&path);
    let x = c.allocate(4 * MIB, &AllocOptions::default()).unwrap();
    let xo = offset_of(&c, &x);
    assert!(xo + x.len <= s || s + area_b.len <= xo, "an allocation landed inside the named area");
    let area_c = c.attach_named("store", 0).unwrap();
    assert_eq!(offset_of(&c, &area_c), s);
    c.copy_to_host(&area_c, 4096, &mut out).unwrap();
    assert_eq!(&out, b"through a");

    // `0` reserves the largest free range, in whole granules.
    let rest = c.attach_named("rest", 0).unwrap();
    let g = c.region().layout().granularity;
    assert!(rest.len > 32 * MIB && rest.len % g == 0, "{}", rest.len);
    let live = c.region().allocations();
    let ro = offset_of(&c, &rest);
    assert!(live.iter().filter(|(off, n)| *off < ro + rest.len && ro < off + n).count() == 1, "{live:?}");
}

/// A process of another host (forged in the owner table: its pids cannot be checked from here) whose heartbeat
/// stopped longer than the owner timeout ago loses its entries and its hold on the lock; one that beats keeps
/// both.
#[test]
fn a_silent_process_of_another_host_is_reclaimed_and_its_lock_taken_over() {
    use layout::{A_LEN, A_OWNER, A_OWNER_GEN, A_START, ALLOC_BYTES, H_LOCK, O_BEAT, O_HOST, O_KIND, O_PID, O_START};
    use layout::{O_STATE, OWNER_BYTES};
    use std::os::unix::fs::FileExt;

    let (_d, path) = region_file(16 * MIB);
    let mut config = CxlConfig::new(&path);
    config.owner_timeout = Some(Duration::from_millis(500));
    config.lock_timeout = Duration::from_millis(300);
    let a = CxlDevice::open(&config).unwrap();
    let l = *a.region().layout();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let put = |off: u64, v: u64| file.write_all_at(&v.to_le_bytes(), off).unwrap();
    let get = |off: u64| {
        let mut b = [0u8; 8];
        file.read_exact_at(&mut b, off).unwrap();
        u64::from_le_bytes(b)
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let other_host = 0xdead_beef_0000_0001u64;
    let token = |pid: u64| (other_host & 0xFFFF_FFFF_0000_0000) | pid;
    // Slot, pid, last beat, and one allocation of a granule at the end of the region for each.
    let forged = [(l.max_owners - 1, 4242u64, now - 60_000), (l.max_owners - 2, 4343u64, now + 60_000)];
    let mut starts = Vec::new();
    for (k, &(slot, pid, beat)) in forged.iter().enumerate() {
        let o = l.owners_offset + u64::from(slot) * OWNER_BYTES;
        for (field, value) in [(O_HOST, other_host), (O_PID, pid), (O_START, 1), (O_KIND, 1), (O_BEAT, beat)] {
            put(o + field, value);
        }
        put(o + O_STATE, 1 << 1 | 1);
        let a_slot = l.max_allocations - 1 - k as u32;
        let at = l.allocs_offset + u64::from(a_slot) * ALLOC_BYTES;
        let start = l.region_size - (k as u64 + 1) * l.granularity;
        put(at + A_START, start);
        put(at + A_OWNER, u64::from(slot) + 1);
        put(at + A_OWNER_GEN, 1);
        put(at + A_LEN, l.granularity);
        starts.push(start);
    }
    // The beating process holds the lock: we wait and give up.
    put(H_LOCK, token(4343));
    let e = a.allocate(4096, &AllocOptions::default()).unwrap_err();
    assert!(e.to_string().contains("pid 4343"), "{e}");
    // The silent one holds it: taken over.
    put(H_LOCK, token(4242));
    let x = a.allocate(4096, &AllocOptions::default()).unwrap();
    assert_eq!(get(H_LOCK), 0, "released after the takeover");
    // The next process to take an owner entry reclaims the silent process's entries, not the beating one's.
    let b = CxlDevice::open(&config).unwrap();
    let live = b.region().allocations();
    assert!(!live.iter().any(|(o, _)| *o == starts[0]), "the silent process's allocation is still reserved");
    assert!(live.iter().any(|(o, _)| *o == starts[1]), "the beating process's allocation was taken");
    let state = |slot: u32| get(l.owners_offset + u64::from(slot) * OWNER_BYTES + O_STATE);
    assert_eq!(state(forged[0].0) & 1, 0);
    assert_eq!(state(forged[1].0) & 1, 1);
    // Our own entries beat: the heartbeat word moves.
    let ours = get(l.owners_offset + u64::from(a.region().process_owner().index) * OWNER_BYTES + O_BEAT);
    std::thread::sleep(Duration::from_millis(400));
    let later = get(l.owners_offset + u64::from(a.region().process_owner().index) * OWNER_BYTES + O_BEAT);
    assert!(ours > 0 && later > ours, "{ours} -> {later}");
    a.free(&x).unwrap();
}

/// Child roles of `processes_share_allocation_and_dead_ones_are_reclaimed`.
#[test]
fn allocation_child() {
    let Ok(role) = std::env::var(CHILD_ENV) else { return };
    if role != "allocate" {
        return;
    }
    let path = std::env::var("MC_CXL_TEST_PATH").unwrap();
    let count: u64 = std::env::var("MC_CXL_TEST_COUNT").unwrap().parse().unwrap();
    let dev = open(Path::new(&path));
    let mut offs = Vec::new();
    for _ in 0..count {
        let a = dev.allocate(MIB, &AllocOptions::default()).unwrap();
        offs.push((a.addr - dev.region().base()).to_string());
        std::mem::forget(a);
    }
    say(&format!("offsets {}", offs.join(",")));
    // Hold them until the parent says so (or kills us).
    let _ = read_stdin_line();
}

#[test]
fn processes_share_allocation_and_dead_ones_are_reclaimed() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let (_d, path) = region_file(40 * MIB);
    let parent = open(&path);
    let env = |n: u64| vec![("MC_CXL_TEST_PATH", path.display().to_string()), ("MC_CXL_TEST_COUNT", n.to_string())];
    let mut kids: Vec<ChildProc> = (0..3).map(|_| ChildProc::spawn("allocation_child", "allocate", &env(8))).collect();
    let mut offsets: Vec<u64> = Vec::new();
    for k in &mut kids {
        offsets.extend(k.expect("offsets").split(',').map(|s| s.parse::<u64>().unwrap()));
    }
    for _ in 0..6 {
        let a = parent.allocate(MIB, &AllocOptions::default()).unwrap();
        offsets.push(a.addr - parent.region().base());
        std::mem::forget(a);
    }
    offsets.sort_unstable();
    assert_eq!(offsets.len(), 30);
    for w in offsets.windows(2) {
        assert!(w[0] + MIB <= w[1], "processes got overlapping allocations: {w:?}");
    }
    // The region is nearly full now; killed children's allocations come back on the next allocation that
    // finds no room.
    let left = parent.region().layout().data_bytes() - 30 * MIB;
    assert!(parent.allocate(left + MIB, &AllocOptions::default()).is_err());
    for k in &mut kids {
        k.kill();
    }
    // The children held the first 24 MiB; only their range (not the tail the parent left) fits 20 MiB.
    assert!(left < 20 * MIB);
    let back = parent.allocate(20 * MIB, &AllocOptions::default()).unwrap();
    assert!(back.addr - parent.region().base() < offsets[24]);
}

#[test]
fn publications_refuse_stale_and_wait_for_in_flight_accesses() {
    let (_d, path) = region_file(16 * MIB);
    let dev = open(&path);
    let region = dev.region().clone();
    let owner = region.register_owner(OwnerKind::Engine).unwrap();
    let a = dev.allocate(8192, &AllocOptions::default()).unwrap();
    let off = region.offset_of(a.addr, a.len).unwrap();
    let p = region.publish(owner, off, 8192).unwrap();
    assert_eq!(p.seq % 2, 1);
    drop(region.access(p, owner, off + 100, 100).unwrap());
    assert_eq!(region.access(p, owner, off + 8000, 200).unwrap_err(), Refusal::OutOfRange);
    // The header is never published.
    assert!(matches!(region.publish(owner, 0, 4096), Err(Error::InvalidArgument(_))));
    // Withdrawing waits for an access in flight, and refuses new ones at once.
    let inside = region.access(p, owner, off, 8192).unwrap();
    let r2 = region.clone();
    let t = std::thread::spawn(move || {
        let start = std::time::Instant::now();
        r2.withdraw(p, Duration::from_secs(10)).unwrap();
        start.elapsed()
    });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(region.access(p, owner, off, 1).unwrap_err(), Refusal::Withdrawn);
    drop(inside);
    assert!(t.join().unwrap() >= Duration::from_millis(90), "withdraw returned while an access was in flight");
    // A withdraw that cannot drain in time is a Timeout.
    let p2 = region.publish(owner, off, 4096).unwrap();
    let stuck = region.access(p2, owner, off, 1).unwrap();
    assert!(matches!(region.withdraw(p2, Duration::from_millis(20)), Err(Error::Timeout(_))));
    drop(stuck);
    // A retired owner's publications are refused.
    let p3 = region.publish(owner, off, 4096).unwrap();
    region.retire_owner(owner);
    assert_eq!(region.access(p3, owner, off, 1).unwrap_err(), Refusal::OwnerGone);
    assert!(matches!(region.owner_status(owner), mooncake_device_cxl::OwnerStatus::Gone));
}

#[test]
fn a_dead_holders_lock_is_taken_over_and_a_foreign_one_times_out() {
    let (_d, path) = region_file(16 * MIB);
    let dev =
        CxlDevice::open(&CxlConfig { lock_timeout: Duration::from_millis(300), ..CxlConfig::new(&path) }).unwrap();
    let file = std::fs::File::options().read(true).write(true).open(&path).unwrap();
    let me = mooncake_device_cxl::Identity::current();
    // A token of this host whose holder is gone (no live process holds the file lock).
    let dead = (me.host & 0xFFFF_FFFF_0000_0000) | 0x7FFF_FFF0;
    file.write_at(&dead.to_le_bytes(), layout::H_LOCK).unwrap();
    let a = dev.allocate(4096, &AllocOptions::default()).unwrap();
    dev.free(&a).unwrap();
    // A token of another host: waited for, then reported with its holder.
    let foreign = ((me.host ^ 0xFFFF_0000_0000_0000) & 0xFFFF_FFFF_0000_0000) | 4242;
    file.write_at(&foreign.to_le_bytes(), layout::H_LOCK).unwrap();
    match dev.allocate(4096, &AllocOptions::default()) {
        Err(Error::Unavailable { reason }) => {
            assert!(reason.contains("pid 4242") && reason.contains(&path.display().to_string()), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    file.write_at(&0u64.to_le_bytes(), layout::H_LOCK).unwrap();
    let a = dev.allocate(4096, &AllocOptions::default()).unwrap();
    dev.free(&a).unwrap();
}
