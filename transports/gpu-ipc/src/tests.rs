//! The GPU IPC transport between two engines in one process, over a test-only "cuda" device whose memory the
//! CPU reaches only through its copy calls (its addresses are mapped nowhere, so a CPU access would crash the
//! test) and whose handles are real: a legacy-style 64-byte handle naming the allocation, or a memfd passed as
//! a shareable fd through `pidfd_getfd`.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use mooncake_core::registry::{Availability, DeviceFactory};
use mooncake_core::{
    AllocOptions, Allocation, DeviceCapabilities, EngineConfig, Error, Location, MemoryDevice, MemoryKind, Opcode,
    OwnedMemory, Result, SegmentDescriptor, SharingHandle, TransferEngine, device::check_bounds,
};
use mooncake_raw::HostBuffer;

use crate::section::{FIELD_HANDLE, FIELD_KIND, IpcBuffer};

/// Where the test device's made-up address space starts: never mapped in a user process.
const BASE: u64 = 0x4000_0000_0000_0000;

/// Memory of every test-device allocation, by id, as a memfd (so it can be shared as a file descriptor).
fn storage() -> &'static Mutex<BTreeMap<u64, Arc<OwnedFd>>> {
    static S: OnceLock<Mutex<BTreeMap<u64, Arc<OwnedFd>>>> = OnceLock::new();
    S.get_or_init(Default::default)
}

static NEXT: AtomicU64 = AtomicU64::new(1);
static DEVICE_COPIES: AtomicU64 = AtomicU64::new(0);

/// One allocation, made or imported: where its bytes live.
struct Record {
    len: u64,
    fd: Arc<OwnedFd>,
    /// Made with `shareable`: exported as a shareable fd.
    shareable: bool,
    /// Id in [`storage`] (legacy handles name it); 0 for imports.
    id: u64,
    holds: u64,
    freed: bool,
}

/// Every allocation of the process, as a GPU driver keeps them: any instance of the device knows all of them.
fn records() -> &'static Mutex<BTreeMap<u64, Record>> {
    static R: OnceLock<Mutex<BTreeMap<u64, Record>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

#[derive(Default)]
struct TestGpu;

/// Ends one hold: the allocation goes when it was freed and no hold is left.
struct HoldRelease {
    addr: u64,
}

impl Drop for HoldRelease {
    fn drop(&mut self) {
        let mut records = records().lock().unwrap();
        let gone = records.get_mut(&self.addr).map(|r| {
            r.holds -= 1;
            r.freed && r.holds == 0
        });
        if gone == Some(true) {
            records.remove(&self.addr);
        }
    }
}

fn memfd(len: u64) -> Arc<OwnedFd> {
    let f = tempfile::tempfile().unwrap();
    f.set_len(len).unwrap();
    Arc::new(OwnedFd::from(f))
}

fn io_err(e: std::io::Error) -> Error {
    Error::Io(Arc::new(e))
}

impl TestGpu {
    fn record<R>(&self, a: &Allocation, f: impl FnOnce(&Record) -> R) -> Result<R> {
        match records().lock().unwrap().get(&a.addr) {
            Some(r) if r.len == a.len && !r.freed => Ok(f(r)),
            _ => Err(Error::NotFound(format!("no test-gpu allocation at {:#x}", a.addr))),
        }
    }

    fn file(&self, a: &Allocation) -> Result<std::fs::File> {
        let fd = self.record(a, |r| r.fd.clone())?;
        Ok(std::fs::File::from(fd.as_fd().try_clone_to_owned().map_err(io_err)?))
    }

    fn add(&self, len: u64, fd: Arc<OwnedFd>, shareable: bool, id: u64) -> Allocation {
        let addr = BASE + NEXT.fetch_add(1, Ordering::Relaxed) * (1 << 32);
        records().lock().unwrap().insert(addr, Record { len, fd, shareable, id, holds: 0, freed: false });
        Allocation { addr, len, location: Location::Device(MemoryKind::Cuda, 0), token: addr }
    }
}

impl MemoryDevice for TestGpu {
    fn name(&self) -> &str {
        "cuda"
    }

    fn kind(&self) -> MemoryKind {
        MemoryKind::Cuda
    }

    fn capabilities(&self) -> DeviceCapabilities {
        DeviceCapabilities { host_accessible: false, export_handles: true, device_count: 1, ..Default::default() }
    }

    fn classify(&self, addr: u64, len: u64) -> Option<Location> {
        self.allocation_of(addr, len).map(|a| a.location)
    }

    fn allocate(&self, len: u64, options: &AllocOptions) -> Result<Allocation> {
        let fd = memfd(len);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        storage().lock().unwrap().insert(id, fd.clone());
        Ok(self.add(len, fd, options.shareable, id))
    }

    fn free(&self, a: &Allocation) -> Result<()> {
        let mut records = records().lock().unwrap();
        match records.get_mut(&a.addr) {
            Some(r) if !r.freed => {
                storage().lock().unwrap().remove(&r.id);
                r.freed = true;
                if r.holds == 0 {
                    records.remove(&a.addr);
                }
                Ok(())
            }
            _ => Err(Error::NotFound(format!("free of unknown test-gpu memory {:#x}", a.addr))),
        }
    }

    fn copy_to_host(&self, a: &Allocation, offset: u64, dst: &mut [u8]) -> Result<()> {
        check_bounds(a, offset, dst.len() as u64)?;
        std::os::unix::fs::FileExt::read_exact_at(&self.file(a)?, dst, offset).map_err(io_err)
    }

    fn copy_from_host(&self, src: &[u8], a: &Allocation, offset: u64) -> Result<()> {
        check_bounds(a, offset, src.len() as u64)?;
        std::os::unix::fs::FileExt::write_all_at(&self.file(a)?, src, offset).map_err(io_err)
    }

    fn copy_between(&self, src: &Allocation, so: u64, dst: &Allocation, d_o: u64, len: u64) -> Result<()> {
        check_bounds(src, so, len)?;
        check_bounds(dst, d_o, len)?;
        let mut buf = vec![0u8; len as usize];
        self.copy_to_host(src, so, &mut buf)?;
        self.copy_from_host(&buf, dst, d_o)?;
        DEVICE_COPIES.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn hold(&self, a: &Allocation) -> Result<OwnedMemory> {
        self.record(a, |_| ())?;
        if let Some(r) = records().lock().unwrap().get_mut(&a.addr) {
            r.holds += 1;
        }
        let keep = HoldRelease { addr: a.addr };
        // SAFETY: the range is test-gpu memory, which nothing dereferences (its addresses are mapped nowhere);
        // the record, and so the allocation, stays until `keep` is dropped.
        Ok(unsafe { OwnedMemory::new(a.addr, a.len, Box::new(keep)) })
    }

    fn allocation_of(&self, addr: u64, len: u64) -> Option<Allocation> {
        let records = records().lock().unwrap();
        let (start, r) = records.range(..=addr).next_back()?;
        (!r.freed && addr.checked_add(len)? <= start + r.len).then_some(Allocation {
            addr: *start,
            len: r.len,
            location: Location::Device(MemoryKind::Cuda, 0),
            token: *start,
        })
    }

    fn export_handle(&self, a: &Allocation) -> Result<SharingHandle> {
        let (fd, shareable, id) = self.record(a, |r| (r.fd.clone(), r.shareable, r.id))?;
        if shareable {
            return Ok(SharingHandle { kind: "cuda_posix_fd".into(), data: Vec::new(), fd: Some(fd), len: a.len });
        }
        let mut data = vec![0u8; 64];
        data[..8].copy_from_slice(&id.to_le_bytes());
        Ok(SharingHandle { kind: "cuda_ipc".into(), data, fd: None, len: a.len })
    }

    fn import_handle(&self, h: &SharingHandle) -> Result<Allocation> {
        let fd = match h.kind.as_str() {
            "cuda_ipc" if h.data.len() == 64 => {
                let id = u64::from_le_bytes(h.data[..8].try_into().unwrap());
                storage()
                    .lock()
                    .unwrap()
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| Error::NotFound(format!("IPC handle of freed test-gpu memory {id}")))?
            }
            "cuda_posix_fd" => h.fd.clone().ok_or_else(|| Error::InvalidArgument("fd handle without fd".into()))?,
            k => return Err(Error::InvalidArgument(format!("test-gpu cannot import {k:?} ({} bytes)", h.data.len()))),
        };
        Ok(self.add(h.len, fd, false, 0))
    }
}

mooncake_core::inventory::submit! {
    DeviceFactory {
        name: "cuda",
        summary: "test-only GPU: memfd-backed, reachable only through its copies",
        probe: || Availability::Available,
        create: || Ok(Arc::new(TestGpu)),
    }
}

fn engine(protocols: &[&str]) -> TransferEngine {
    mooncake_metadata_p2p::link();
    mooncake_device_host::link();
    mooncake_transport_tcp::link();
    let config = EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols(protocols.iter().copied());
    TransferEngine::new(config).expect("starting an engine")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn gpu(len: usize, shareable: bool, seed: u8) -> (Arc<dyn MemoryDevice>, Allocation) {
    let dev: Arc<dyn MemoryDevice> = Arc::new(TestGpu);
    let a = dev.allocate(len as u64, &AllocOptions { shareable, ..Default::default() }).unwrap();
    dev.copy_from_host(&pattern(seed, len), &a, 0).unwrap();
    (dev, a)
}

fn bytes(dev: &Arc<dyn MemoryDevice>, a: &Allocation) -> Vec<u8> {
    let mut out = vec![0u8; a.len as usize];
    dev.copy_to_host(a, 0, &mut out).unwrap();
    out
}

/// GPU to GPU both ways, with both handle forms, small (caller's thread) and large (workers), in batches; host
/// memory on the local side too. Nothing is CPU-dereferenced: the device's addresses are mapped nowhere.
#[test]
fn moves_gpu_memory_between_engines() {
    for shareable in [false, true] {
        const LEN: usize = 6 << 20;
        let (a, b) = (engine(&["nvlink"]), engine(&["nvlink"]));
        let (dev, ga) = gpu(LEN, shareable, 1);
        let (_, gb) = gpu(LEN, shareable, 2);
        a.register_allocation(&dev, &ga, "*").unwrap();
        b.register_allocation(&dev, &gb, "cuda:0").unwrap();
        let pb = b.local_segment_name().to_string();
        let desc = SegmentDescriptor::from_json(b.local_descriptor().to_json().as_bytes()).unwrap();
        let published = desc.buffers[0].section::<IpcBuffer>().unwrap().unwrap();
        assert_eq!(published.kind.as_deref(), Some(if shareable { "cuda_posix_fd" } else { "cuda_ipc" }));
        assert_eq!(published.handle.len(), if shareable { 8 } else { 64 });

        let before = DEVICE_COPIES.load(Ordering::Relaxed);
        for len in [4096u64, LEN as u64] {
            a.transfer_sync(&pb, Opcode::Write, ga.addr, gb.addr, len).unwrap();
            assert!(bytes(&dev, &gb)[..len as usize] == pattern(1, LEN)[..len as usize], "write {len}");
            dev.copy_from_host(&pattern(3, LEN), &gb, 0).unwrap();
            a.transfer_sync(&pb, Opcode::Read, ga.addr, gb.addr, len).unwrap();
            assert!(bytes(&dev, &ga)[..len as usize] == pattern(3, LEN)[..len as usize], "read {len}");
            dev.copy_from_host(&pattern(1, LEN), &ga, 0).unwrap();
        }
        assert!(DEVICE_COPIES.load(Ordering::Relaxed) >= before + 4, "GPU to GPU copies stay on the device");

        // Host memory on the local side: copied by the device straight from and into it.
        let host = HostBuffer::zeroed(1 << 20);
        a.register_owned(host.owned(), "cpu:0").unwrap();
        a.transfer_sync(&pb, Opcode::Read, host.addr(), gb.addr + 4096, 1 << 20).unwrap();
        assert!(host.to_vec() == pattern(3, LEN)[4096..4096 + (1 << 20)]);
        host.write(0, &pattern(9, 1 << 20)).unwrap();
        a.transfer_sync(&pb, Opcode::Write, host.addr(), gb.addr + 100, 1 << 20).unwrap();
        assert!(bytes(&dev, &gb)[100..100 + (1 << 20)] == pattern(9, 1 << 20)[..]);

        a.unregister_memory(ga.addr).unwrap();
        a.unregister_memory(host.addr()).unwrap();
        b.unregister_memory(gb.addr).unwrap();
        a.shutdown();
        b.shutdown();
        dev.free(&ga).unwrap();
        dev.free(&gb).unwrap();
    }
}

/// A buffer registered inside an allocation is published with its offset, and peers land at the right bytes.
#[test]
fn buffers_inside_an_allocation_carry_their_offset() {
    let (a, b) = (engine(&["nvlink"]), engine(&["nvlink"]));
    let (dev, ga) = gpu(1 << 20, false, 4);
    let (_, gb) = gpu(1 << 20, false, 5);
    a.register_allocation(&dev, &ga, "*").unwrap();
    // SAFETY: test-gpu memory is never dereferenced by the CPU; it stays allocated until the end of the test.
    unsafe { b.register_memory(gb.addr + 65536, 65536, "*") }.unwrap();
    let desc = b.local_descriptor();
    assert_eq!(desc.buffers[0].name, "cuda:0", "the device classified the foreign pointer");
    assert_eq!(desc.buffers[0].section::<IpcBuffer>().unwrap().unwrap().offset, 65536);
    let pb = b.local_segment_name().to_string();
    a.transfer_sync(&pb, Opcode::Write, ga.addr, gb.addr + 65536 + 8, 4096).unwrap();
    assert!(bytes(&dev, &gb)[65536 + 8..65536 + 8 + 4096] == pattern(4, 1 << 20)[..4096]);
    a.shutdown();
    b.shutdown();
}

/// Host buffers are not published for GPU IPC: a request to one goes to another transport, or, with none,
/// fails typed. A device pointer registered as host memory is refused.
#[test]
fn host_buffers_route_elsewhere_and_wrong_locations_are_refused() {
    let (a, b) = (engine(&["nvlink"]), engine(&["tcp", "nvlink"]));
    let (dev, ga) = gpu(1 << 16, false, 6);
    a.register_allocation(&dev, &ga, "*").unwrap();
    let host = HostBuffer::zeroed(1 << 16);
    b.register_owned(host.owned(), "cpu:0").unwrap();
    assert_eq!(b.local_descriptor().buffers[0].fields.get(FIELD_HANDLE), None);
    let pb = b.local_segment_name().to_string();
    let r = a.transfer_sync(&pb, Opcode::Write, ga.addr, host.addr(), 4096);
    assert!(matches!(r, Err(Error::Unavailable { .. })), "{r:?}");
    // b has tcp too: b -> a's GPU buffer goes over nvlink, a's (absent) host buffers would go over tcp.
    let pa = a.local_segment_name().to_string();
    b.transfer_sync(&pa, Opcode::Read, host.addr(), ga.addr, 4096).unwrap();
    assert!(host.to_vec()[..4096] == pattern(6, 1 << 16)[..4096]);
    // SAFETY: refused before anything is registered or touched.
    let wrong = unsafe { a.register_memory(ga.addr, ga.len, "cpu:0") };
    assert!(matches!(wrong, Err(Error::InvalidArgument(ref m)) if m.contains("cuda:0")), "{wrong:?}");
    a.shutdown();
    b.shutdown();
}

/// Handles of freed memory, of exited processes, of the wrong size or kind: typed errors, nothing cached.
#[test]
fn bad_handles_are_typed_errors() {
    let (a, b) = (engine(&["nvlink"]), engine(&["nvlink"]));
    let (dev, ga) = gpu(1 << 16, false, 7);
    let (_, gb) = gpu(1 << 16, false, 8);
    a.register_allocation(&dev, &ga, "*").unwrap();
    b.register_allocation(&dev, &gb, "*").unwrap();
    let pb = b.local_segment_name().to_string();
    let handle = a.open_segment(&pb).unwrap();
    let seg = a.segment(handle).unwrap();
    let rt = tokio_runtime();
    let transport = started_transport(&rt);
    type Edit = Box<dyn Fn(&mut mooncake_core::Fields)>;
    type Expect = fn(&Error) -> bool;
    let cases: Vec<(&str, Edit, Expect)> = vec![
        (
            "freed memory",
            Box::new(|f| {
                f.insert(FIELD_HANDLE, "FF".repeat(64));
            }),
            |e| matches!(e, Error::NotFound(_)),
        ),
        (
            "odd hex",
            Box::new(|f| {
                f.insert(FIELD_HANDLE, "ABC");
            }),
            |e| matches!(e, Error::Metadata(_) | Error::MalformedJson(_) | Error::InvalidArgument(_)),
        ),
        (
            "wrong size",
            Box::new(|f| {
                f.insert(FIELD_HANDLE, "00".repeat(12));
                f.remove(FIELD_KIND);
            }),
            |e| matches!(e, Error::InvalidArgument(m) if m.contains("12-byte")),
        ),
        (
            "other vendor's kind",
            Box::new(|f| {
                f.insert(FIELD_KIND, "hip_ipc");
            }),
            |e| matches!(e, Error::InvalidArgument(m) if m.contains("hip_ipc")),
        ),
        (
            "exited process",
            Box::new(|f| {
                f.insert(FIELD_HANDLE, crate::section::encode_hex(&crate::section::encode_fd_handle(5, i32::MAX)));
                f.insert(FIELD_KIND, "cuda_posix_fd");
            }),
            |e| matches!(e, Error::RemoteDisconnected { .. }),
        ),
    ];
    // As a peer in another process sees it (no pid of ours): the handles are imported.
    let seg = Arc::new(another_process(&seg));
    for (name, edit, expected) in cases {
        let mut bad = (*seg).clone();
        edit(&mut bad.descriptor.buffers[0].fields);
        let r = run_on(&transport, &a, Arc::new(bad), ga.addr);
        assert!(r.as_ref().is_err_and(expected), "{name}: {r:?}");
        assert_eq!(transport.mapped(), 0, "{name}: a failed import is not cached");
    }
    let r = run_on(&transport, &a, seg.clone(), ga.addr);
    assert_eq!(r.unwrap(), 4096);
    assert_eq!(transport.mapped(), 1);
    mooncake_core::Transport::forget_peer(&transport, &pb);
    assert_eq!(transport.mapped(), 0);
    a.shutdown();
    b.shutdown();
}

fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// `seg` as a peer in another process of this host sees it: without our pid, so its handles are imported.
fn another_process(seg: &mooncake_core::RemoteSegment) -> mooncake_core::RemoteSegment {
    let mut other = seg.clone();
    assert!(other.descriptor.fields.remove(crate::section::FIELD_PID).is_some(), "our engines publish their pid");
    other
}

/// Both handle forms, imported as a peer in another process would (a legacy-style handle, and a shareable fd
/// fetched with pidfd_getfd), land on the right bytes; the mapping is cached once per buffer.
#[test]
fn handles_are_imported_by_peers_in_other_processes() {
    for shareable in [false, true] {
        let (a, b) = (engine(&["nvlink"]), engine(&["nvlink"]));
        let (dev, ga) = gpu(1 << 16, false, 13);
        let (_, gb) = gpu(1 << 16, shareable, 14);
        a.register_allocation(&dev, &ga, "*").unwrap();
        b.register_allocation(&dev, &gb, "*").unwrap();
        let pb = b.local_segment_name().to_string();
        let seg = Arc::new(another_process(&a.segment(a.open_segment(&pb).unwrap()).unwrap()));
        let rt = tokio_runtime();
        let transport = started_transport(&rt);
        assert_eq!(run_on(&transport, &a, seg.clone(), ga.addr).unwrap(), 4096);
        assert_eq!(run_on(&transport, &a, seg, ga.addr).unwrap(), 4096);
        assert_eq!(transport.mapped(), 1, "imported once");
        assert!(bytes(&dev, &gb)[..4096] == pattern(13, 1 << 16)[..4096], "shareable={shareable}");
        a.shutdown();
        b.shutdown();
    }
}

/// A transport started like an engine would start it, with the test device.
fn started_transport(rt: &tokio::runtime::Runtime) -> crate::GpuIpcTransport {
    use mooncake_core::Transport;
    let transport = crate::GpuIpcTransport::new(&crate::NVLINK, &Default::default());
    let ctx = mooncake_core::TransportContext {
        local_name: "probe".into(),
        bind_host: "127.0.0.1".into(),
        regions: Arc::new(mooncake_core::RegionTable::new()),
        runtime: rt.handle().clone(),
        peer_events: Arc::new(NoEvents),
        peers: Arc::new(mooncake_core::NoPeerHandshake),
        devices: vec![Arc::new(TestGpu)],
    };
    rt.block_on(transport.start(&ctx)).unwrap();
    transport
}

/// One 4 KiB write from `local_addr` (registered in `engine`) to the first buffer of `target`.
fn run_on(
    transport: &crate::GpuIpcTransport,
    engine: &TransferEngine,
    target: Arc<mooncake_core::RemoteSegment>,
    local_addr: u64,
) -> Result<u64> {
    use mooncake_core::Transport;
    let local = mooncake_core::LocalRange::check(engine.regions(), local_addr, 4096, "test")?;
    let remote = target.descriptor.buffers[0].addr;
    transport.transfer_blocking(&target, Opcode::Write, &local, remote, std::time::Duration::from_secs(5)).unwrap()
}

struct NoEvents;

impl mooncake_core::PeerEvents for NoEvents {
    fn peer_failed(&self, _segment_name: &str) {}
}

/// An unregistered GPU buffer handed to the unchecked calls (the Python binding's path for upstream's TCP
/// semantics) is moved through its device over tcp, never dereferenced by the CPU.
#[test]
fn unregistered_gpu_memory_moves_over_tcp_through_its_device() {
    let (a, b) = (engine(&["tcp"]), engine(&["tcp"]));
    let (dev, ga) = gpu(1 << 20, false, 11);
    let host = HostBuffer::zeroed(1 << 20);
    b.register_owned(host.owned(), "cpu:0").unwrap();
    let pb = b.local_segment_name().to_string();
    // SAFETY: the local range is test-gpu memory (claimed by the linked device, never dereferenced) that stays
    // allocated until the end of the test, after the blocking calls returned.
    let unchecked = unsafe { a.unchecked() };
    unchecked.transfer_sync(&pb, Opcode::Write, ga.addr + 512, host.addr(), 1 << 19).unwrap();
    assert!(host.to_vec()[..1 << 19] == pattern(11, 1 << 20)[512..512 + (1 << 19)]);
    host.write(0, &pattern(12, 1 << 20)).unwrap();
    unchecked.transfer_sync(&pb, Opcode::Read, ga.addr, host.addr(), 1 << 20).unwrap();
    assert!(bytes(&dev, &ga) == pattern(12, 1 << 20));
    a.shutdown();
    b.shutdown();
    dev.free(&ga).unwrap();
}
