//! Engine behaviour not tied to one transport: registration rules, location detection, and calls
//! after shutdown.

use mooncake::{EngineConfig, Error, Opcode, TransferEngine};

fn engine() -> TransferEngine {
    mooncake::link_all();
    TransferEngine::new(EngineConfig::new("127.0.0.1", "P2PHANDSHAKE")).expect("engine")
}

#[test]
fn registration_rules() {
    let e = engine();
    let buf = vec![0u8; 1 << 16];
    let a = buf.as_ptr() as u64;
    assert!(matches!(e.register_memory(a, 0, "cpu:0"), Err(Error::InvalidArgument(_))));
    assert!(matches!(e.register_memory(a, 16, "cuda:x"), Err(Error::InvalidArgument(_))));
    e.register_memory(a, 4096, "*").unwrap();
    assert!(e.local_descriptor().buffers[0].name.starts_with("cpu:"), "'*' detects host memory");
    assert!(matches!(e.register_memory(a + 100, 10, "cpu:0"), Err(Error::AddressOverlapped { .. })));
    // A batch with one bad entry registers nothing.
    let r = e.register_memory_batch(&[(a + 8192, 4096), (a + 100, 8)], "cpu:0");
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
    let r = e.register_memory(buf.as_ptr() as u64, 4096, "cpu:0");
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
    a.register_memory(src.as_ptr() as u64, len as u64, "*").unwrap();
    b.register_memory(dst.as_mut_ptr() as u64, len as u64, "*").unwrap();
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
