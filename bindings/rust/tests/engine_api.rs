//! Engine behaviour not tied to one transport: registration rules, location detection, and calls
//! after shutdown.

use mooncake::{EngineConfig, Error, Opcode, TransferEngine};

fn engine() -> TransferEngine {
    mooncake::link_all();
    TransferEngine::new(EngineConfig::new("127.0.0.1", "P2PHANDSHAKE")).expect("engine")
}

/// Registers `[addr, +len)` of a test buffer by address.
fn register(e: &TransferEngine, addr: u64, len: u64, location: &str) -> mooncake::Result<()> {
    // SAFETY: every caller passes a range of a buffer that outlives the registration (it is unregistered, or the
    // engine shut down, before the buffer is dropped) and is read only between transfers.
    unsafe { e.register_memory(addr, len, location) }
}

#[test]
fn registration_rules() {
    let e = engine();
    let buf = vec![0u8; 1 << 16];
    let a = buf.as_ptr() as u64;
    assert!(matches!(register(&e, a, 0, "cpu:0"), Err(Error::InvalidArgument(_))));
    assert!(matches!(register(&e, a, 16, "cuda:x"), Err(Error::InvalidArgument(_))));
    register(&e, a, 4096, "*").unwrap();
    assert!(e.local_descriptor().buffers[0].name.starts_with("cpu:"), "'*' detects host memory");
    assert!(matches!(register(&e, a + 100, 10, "cpu:0"), Err(Error::AddressOverlapped { .. })));
    // A batch with one bad entry registers nothing.
    // SAFETY: `buf` outlives the engine's registrations (unregistered below); the batch is refused anyway.
    let r = unsafe { e.register_memory_batch(&[(a + 8192, 4096), (a + 100, 8)], "cpu:0") };
    assert!(matches!(r, Err(Error::AddressOverlapped { .. })));
    assert_eq!(e.local_descriptor().buffers.len(), 1);
    assert!(matches!(e.unregister_memory(a + 1), Err(Error::AddressNotRegistered { .. })));
    e.unregister_memory(a).unwrap();
    assert!(e.local_descriptor().buffers.is_empty());
}

#[test]
fn unknown_segments_and_bad_names_are_typed_errors() {
    let e = engine();
    let r = e.open_segment("not a host:port");
    assert!(matches!(r, Err(Error::InvalidArgument(_)) | Err(Error::NotFound(_))), "{r:?}");
    // Nothing listens on port 1 of 127.0.0.1: the peer is gone, quickly.
    let r = e.open_segment("127.0.0.1:1");
    assert!(matches!(r, Err(Error::RemoteDisconnected { .. })), "{r:?}");
    let r = e.transfer_sync("127.0.0.1:1", Opcode::Write, 1, 1, 1);
    assert!(r.is_err());
}

#[test]
fn calls_after_shutdown_fail_cleanly() {
    let e = engine();
    let buf = vec![0u8; 4096];
    e.shutdown();
    let r = register(&e, buf.as_ptr() as u64, 4096, "cpu:0");
    assert!(matches!(r, Err(Error::NotInitialized(_))), "{r:?}");
    assert!(matches!(e.open_segment("127.0.0.1:15000"), Err(Error::NotInitialized(_))));
    e.shutdown(); // twice is fine
}

#[test]
fn unknown_protocol_is_a_clear_error() {
    mooncake::link_all();
    let r = TransferEngine::new(EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols(["warp"]));
    let msg = r.err().expect("must fail").to_string();
    assert!(msg.contains("warp") && msg.contains("tcp"), "names what is linked: {msg}");
    let r = TransferEngine::new(EngineConfig::new("127.0.0.1", "zookeeper://x:1"));
    assert!(matches!(r, Err(Error::Unavailable { .. })));
}

#[test]
fn run_transfers_gives_each_transfer_its_own_result() {
    use mooncake::{CALLER_THREAD_MAX_BYTES, Transfer};
    let (a, b) = (engine(), engine());
    let len = 3 * CALLER_THREAD_MAX_BYTES as usize;
    let src: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let mut dst = vec![0u8; len];
    register(&a, src.as_ptr() as u64, len as u64, "*").unwrap();
    register(&b, dst.as_mut_ptr() as u64, len as u64, "*").unwrap();
    let (s, d) = (src.as_ptr() as u64, dst.as_ptr() as u64);
    let targets = [b.local_segment_name().to_string(), "127.0.0.1:1".to_string()];
    let write = |target, local_addr, remote_addr, length| Transfer {
        target,
        opcode: Opcode::Write,
        local_addr,
        remote_addr,
        length,
    };

    // Small, one peer, one opcode: the caller-thread path; a bad remote range fails alone.
    let small = [write(0, s, d, 4096), write(0, s, d + len as u64, 4096), write(0, s + 4096, d + 4096, 4096)];
    let r = a.run_transfers(&targets, &small);
    assert!(r[0].is_ok() && r[2].is_ok(), "{r:?}");
    assert!(matches!(r[1], Err(Error::AddressNotRegistered { .. })), "{r:?}");
    assert_eq!(dst[..8192], src[..8192]);

    // Large and to two targets: submitted at start; the unreachable target fails only its own transfer, and a
    // target index past the list is an argument error.
    let big = [write(0, s, d, len as u64), write(1, s, 0x1000, 16), write(7, s, d, 16)];
    let pending = a.start_transfers(&targets, &big);
    let r = pending.wait();
    assert!(r[0].is_ok(), "{r:?}");
    assert!(r[1].as_ref().is_err_and(|e| e.is_peer_unreachable()), "{r:?}");
    assert!(matches!(r[2], Err(Error::InvalidArgument(_))), "{r:?}");
    assert_eq!(dst, src);
    assert!(a.run_transfers::<String>(&[], &[]).is_empty());
    a.unregister_memory(s).unwrap();
    b.unregister_memory(d).unwrap();
}

/// Memory the program owns registers without `unsafe`: a device allocation (held by the engine while registered,
/// even after it is freed) and a `HostBuffer`.
#[test]
fn safe_registration_holds_the_memory() {
    use mooncake::{AllocOptions, HostBuffer, MemoryDevice, MemoryKind};
    let (a, b) = (engine(), engine());
    let host: std::sync::Arc<dyn MemoryDevice> =
        a.devices().iter().find(|d| d.kind() == MemoryKind::Host).cloned().expect("a host memory device");
    let alloc = host.allocate(1 << 16, &AllocOptions::default()).unwrap();
    host.copy_from_host(b"device bytes", &alloc, 0).unwrap();
    a.register_allocation(&host, &alloc, "*").unwrap();
    assert!(a.register_allocation(&host, &alloc, "*").is_err(), "registered twice");
    let dst = HostBuffer::zeroed(1 << 16);
    b.register_owned(dst.owned(), "cpu:0").unwrap();
    let peer = b.local_segment_name().to_string();
    // Freed while registered: the engine's hold keeps the mapping, so the transfer reads valid memory.
    host.free(&alloc).unwrap();
    a.transfer_sync(&peer, Opcode::Write, alloc.addr, dst.addr(), 12).unwrap();
    assert_eq!(&dst.to_vec()[..12], b"device bytes");
    a.unregister_memory(alloc.addr).unwrap();
    // A forged allocation is refused by the device.
    let forged = mooncake::Allocation { addr: 0x1000, len: 4096, location: mooncake::Location::Cpu(None), token: 1 };
    assert!(a.register_allocation(&host, &forged, "*").is_err());
    // The buffer outlives its owner while registered.
    let addr = dst.addr();
    drop(dst);
    a.register_owned(HostBuffer::from_vec(vec![5u8; 64]).owned(), "cpu:0").unwrap();
    let src = a.local_descriptor().buffers[0].addr;
    a.transfer_sync(&peer, Opcode::Write, src, addr, 64).unwrap();
    b.unregister_memory(addr).unwrap();
}

/// Safe calls over TCP refuse a local range outside registered memory with a typed error, whatever the call
/// (upstream's TCP transport would send from it); the `unsafe` unchecked calls accept it, as the Python binding
/// needs.
#[test]
fn tcp_safe_calls_check_local_ranges_unchecked_calls_do_not() {
    let config = || EngineConfig::new("127.0.0.1", "P2PHANDSHAKE").with_protocols(["tcp"]);
    let (a, b) = (TransferEngine::new(config()).unwrap(), TransferEngine::new(config()).unwrap());
    let dst = mooncake::HostBuffer::zeroed(8192);
    b.register_owned(dst.owned(), "cpu:0").unwrap();
    let src = mooncake::HostBuffer::from_vec(vec![3u8; 8192]);
    a.register_owned(src.owned(), "cpu:0").unwrap();
    let peer = b.local_segment_name().to_string();
    let stray = vec![7u8; 4096];
    let s = stray.as_ptr() as u64;
    for op in [Opcode::Write, Opcode::Read] {
        for (local, len) in [(s, 4096), (src.addr() + 4096, 8192), (src.addr() - 1, 2)] {
            let r = a.transfer_sync(&peer, op, local, dst.addr(), len);
            assert!(matches!(r, Err(Error::AddressNotRegistered { .. })), "{op:?} {local:#x}+{len}: {r:?}");
            let r = a.batch_transfer_sync_each(&peer, op, &[src.addr(), local], &[dst.addr(), dst.addr()], &[8, len]);
            assert!(matches!(r, Err(Error::AddressNotRegistered { .. })), "{op:?} batch: {r:?}");
            let h = a.open_segment(&peer).unwrap();
            let req = mooncake::TransferRequest {
                opcode: op,
                local_addr: local,
                target: h,
                remote_addr: dst.addr(),
                length: len,
            };
            let id = a.allocate_batch(1).unwrap();
            assert!(matches!(a.submit_transfer(id, &[req]), Err(Error::AddressNotRegistered { .. })));
            let e2 = a.clone();
            let r = a.block_on(async move { e2.transfer(&[req]).await }).unwrap();
            assert!(matches!(r, Err(Error::AddressNotRegistered { .. })), "{op:?} async: {r:?}");
            let _ = a.free_batch(id);
        }
    }
    assert!(dst.to_vec().iter().all(|x| *x == 0), "a refused call moved bytes");
    // SAFETY: `stray` is alive, unborrowed and unchanged until the blocking call returns.
    let unchecked = unsafe { a.unchecked() };
    unchecked.transfer_sync(&peer, Opcode::Write, s, dst.addr(), 4096).unwrap();
    assert_eq!(&dst.to_vec()[..4096], &stray[..]);
    a.shutdown();
    b.shutdown();
}
