//! Memory of a device the CPU cannot read is never dereferenced: CPU transports move its bytes through the
//! device (staging). The test-only device (`common::far::FarDevice`) keeps its bytes in vectors and hands out
//! addresses that are mapped nowhere in this process, so a CPU access through one of them would crash the test
//! instead of passing by luck. It is not in this binary's registry: the tests hand it to the engines.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::far::FarDevice;
use mooncake::{AllocOptions, EngineConfig, Error, HostBuffer, MemoryDevice, Opcode, TransferEngine, TransferRequest};

fn engine(protocols: &[&str]) -> TransferEngine {
    mooncake::link_all();
    let config = EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols(protocols.iter().copied());
    TransferEngine::new(config).expect("starting an engine")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Over tcp, device memory moves both as the local side (the initiator stages it) and as the target (the
/// serving side stages it), on the caller-thread path, the lanes, striped, in pipelined chunks (pieces over
/// 4 MiB), and in async batches.
#[test]
fn tcp_moves_device_memory_through_the_device() {
    let far = Arc::new(FarDevice::default());
    let dev: Arc<dyn MemoryDevice> = far.clone();
    let (a, b) = (engine(&["tcp"]), engine(&["tcp"]));
    const LEN: usize = (21 << 20) + 4097;
    let gpu = dev.allocate(LEN as u64, &AllocOptions::default()).unwrap();
    dev.copy_from_host(&pattern(1, LEN), &gpu, 0).unwrap();
    a.register_allocation(&dev, &gpu, "*").unwrap();
    assert_eq!(a.local_descriptor().buffers[0].name, "cuda:0", "the device classifies its memory");
    let host = HostBuffer::zeroed(LEN);
    b.register_owned(host.owned(), "cpu:0").unwrap();
    let (pa, pb) = (a.local_segment_name().to_string(), b.local_segment_name().to_string());

    for len in [4096u64, (6 << 20) + 3, LEN as u64] {
        // Initiator side: device memory is the local range.
        dev.copy_from_host(&pattern(1, LEN), &gpu, 0).unwrap();
        a.transfer_sync(&pb, Opcode::Write, gpu.addr, host.addr(), len).unwrap();
        assert!(host.to_vec()[..len as usize] == pattern(1, LEN)[..len as usize], "{len}: device -> host");
        host.write(0, &pattern(2, LEN)).unwrap();
        a.transfer_sync(&pb, Opcode::Read, gpu.addr, host.addr(), len).unwrap();
        assert!(far.bytes(&gpu)[..len as usize] == pattern(2, LEN)[..len as usize], "{len}: host -> device");
        // Serving side: device memory is the target of a peer's request.
        dev.copy_from_host(&pattern(3, LEN), &gpu, 0).unwrap();
        b.transfer_sync(&pa, Opcode::Read, host.addr(), gpu.addr, len).unwrap();
        assert!(host.to_vec()[..len as usize] == pattern(3, LEN)[..len as usize], "{len}: peer reads device");
        host.write(0, &pattern(4, LEN)).unwrap();
        b.transfer_sync(&pa, Opcode::Write, host.addr(), gpu.addr, len).unwrap();
        assert!(far.bytes(&gpu)[..len as usize] == pattern(4, LEN)[..len as usize], "{len}: peer writes device");
    }

    // A batch of small requests at offsets, as the caller-thread batch path would take for host memory.
    dev.copy_from_host(&pattern(5, LEN), &gpu, 0).unwrap();
    let offsets: Vec<u64> = (0..16).map(|i| i * 8192 + 100).collect();
    let locals: Vec<u64> = offsets.iter().map(|o| gpu.addr + o).collect();
    let remotes: Vec<u64> = offsets.iter().map(|o| host.addr() + o).collect();
    a.batch_transfer_sync(&pb, Opcode::Write, &locals, &remotes, &[1000; 16]).unwrap();
    let (h, g) = (host.to_vec(), pattern(5, LEN));
    for o in &offsets {
        assert_eq!(h[*o as usize..*o as usize + 1000], g[*o as usize..*o as usize + 1000]);
    }
    // Async, through the runtime.
    let handle = a.open_segment(&pb).unwrap();
    let req = TransferRequest {
        opcode: Opcode::Read,
        local_addr: gpu.addr + 10,
        target: handle,
        remote_addr: host.addr(),
        length: 5000,
    };
    let a2 = a.clone();
    let r = a.block_on(async move { a2.transfer(&[req]).await }).unwrap().unwrap();
    assert!(matches!(r[..], [Ok(5000)]), "{r:?}");
    assert_eq!(far.bytes(&gpu)[10..5010], h[..5000]);
    assert!(far.copies.load(Ordering::Relaxed) > 0);

    // A range past the allocation is refused, on both sides, before anything moves.
    let r = a.transfer_sync(&pb, Opcode::Write, gpu.addr + LEN as u64 - 8, host.addr(), 16);
    assert!(matches!(r, Err(Error::AddressNotRegistered { .. })), "{r:?}");
    let r = b.transfer_sync(&pa, Opcode::Read, host.addr(), gpu.addr + LEN as u64 - 8, 16);
    assert!(matches!(r, Err(Error::AddressNotRegistered { .. })), "{r:?}");

    // Freed while registered: the engine holds the device's storage, and the device refuses copies of an
    // allocation it freed with a typed error; nothing is dereferenced either way.
    dev.free(&gpu).unwrap();
    let r = a.transfer_sync(&pb, Opcode::Write, gpu.addr, host.addr(), 64);
    assert!(matches!(r, Err(Error::NotFound(_))), "{r:?}");
    let r = b.transfer_sync(&pa, Opcode::Read, host.addr(), gpu.addr, 64);
    assert!(matches!(r, Err(Error::RemoteRejected { .. })), "{r:?}");
    // The same for requests large enough to be staged in pipelined chunks: the first chunk is copied before
    // anything is sent, so the refusal is this request's alone.
    let r = a.transfer_sync(&pb, Opcode::Write, gpu.addr, host.addr(), LEN as u64);
    assert!(matches!(r, Err(Error::NotFound(_))), "{r:?}");
    let r = b.transfer_sync(&pa, Opcode::Read, host.addr(), gpu.addr, LEN as u64);
    assert!(matches!(r, Err(Error::RemoteRejected { .. })), "{r:?}");
    a.unregister_memory(gpu.addr).unwrap();
    a.shutdown();
    b.shutdown();
}

/// Memory registered by address at a device location, with a device that finds its allocation
/// (`allocation_of`), is staged too; a device location no device owns is refused with a typed error.
#[test]
fn device_memory_registered_by_address() {
    let far = Arc::new(FarDevice::default());
    let dev: Arc<dyn MemoryDevice> = far.clone();
    let (a, b) = (engine(&["tcp"]), engine(&["tcp"]));
    let gpu = dev.allocate(1 << 16, &AllocOptions::default()).unwrap();
    dev.copy_from_host(&pattern(6, 1 << 16), &gpu, 0).unwrap();
    let host = HostBuffer::zeroed(1 << 16);
    b.register_owned(host.owned(), "cpu:0").unwrap();
    let pb = b.local_segment_name().to_string();
    // The engine's own device list does not have `far` (it is not linked through the registry), so memory
    // registered by address at `cuda:0` has no owner: the CPU must not touch it.
    // SAFETY: the range is device memory the CPU never dereferences (no owner: unreachable); it stays the
    // device's until unregistered below.
    unsafe { a.register_memory(gpu.addr, gpu.len, "cuda:0") }.unwrap();
    let r = a.transfer_sync(&pb, Opcode::Write, gpu.addr, host.addr(), 64);
    assert!(matches!(r, Err(Error::Unsupported { .. })), "{r:?}");
    a.unregister_memory(gpu.addr).unwrap();
    // Held through the device instead, it moves.
    a.register_allocation(&dev, &gpu, "cuda:0").unwrap();
    a.transfer_sync(&pb, Opcode::Write, gpu.addr + 4096, host.addr(), 4096).unwrap();
    assert_eq!(host.to_vec()[..4096], pattern(6, 1 << 16)[4096..8192]);
    a.unregister_memory(gpu.addr).unwrap();
    a.shutdown();
    b.shutdown();
}

/// shm copies with the kernel (`process_vm_*`), which cannot reach device memory either: local device memory
/// is staged by the initiator; a peer's device memory is not published for shm, so no request is routed to it
/// (a typed error when nothing else can reach it).
#[test]
fn shm_stages_local_device_memory() {
    if !mooncake::registry::transport("shm").is_ok_and(|f| (f.probe)().is_available()) {
        println!("shm unavailable here; skipped");
        return;
    }
    let far = Arc::new(FarDevice::default());
    let dev: Arc<dyn MemoryDevice> = far.clone();
    let (a, b) = (engine(&["shm"]), engine(&["shm"]));
    const LEN: usize = 3 << 20;
    let gpu = dev.allocate(LEN as u64, &AllocOptions::default()).unwrap();
    dev.copy_from_host(&pattern(7, LEN), &gpu, 0).unwrap();
    a.register_allocation(&dev, &gpu, "*").unwrap();
    let host = HostBuffer::zeroed(LEN);
    b.register_owned(host.owned(), "cpu:0").unwrap();
    let (pa, pb) = (a.local_segment_name().to_string(), b.local_segment_name().to_string());
    for len in [4096u64, LEN as u64] {
        a.transfer_sync(&pb, Opcode::Write, gpu.addr, host.addr(), len).unwrap();
        assert!(host.to_vec()[..len as usize] == pattern(7, LEN)[..len as usize], "{len}: device -> host");
        host.write(0, &pattern(8, LEN)).unwrap();
        a.transfer_sync(&pb, Opcode::Read, gpu.addr, host.addr(), len).unwrap();
        assert!(far.bytes(&gpu)[..len as usize] == pattern(8, LEN)[..len as usize], "{len}: host -> device");
        dev.copy_from_host(&pattern(7, LEN), &gpu, 0).unwrap();
    }
    // The peer's device memory is not published for shm: with no other transport, the request has no route.
    let r = b.transfer_sync(&pa, Opcode::Read, host.addr(), gpu.addr, 64);
    assert!(matches!(r, Err(Error::Unavailable { ref reason }) if reason.contains("cuda:0")), "{r:?}");
    a.unregister_memory(gpu.addr).unwrap();
    a.shutdown();
    b.shutdown();
}
